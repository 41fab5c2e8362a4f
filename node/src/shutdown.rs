//! The one shutdown trigger of nearby's processes: Ctrl-C (SIGINT) or SIGTERM.

use std::future::Future;

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is *called*, not when
/// the future is first polled: a process that announces it is ready and is then told to stop
/// at once must stop cleanly, not die of the default signal action. MUST be called inside a
/// tokio runtime (or with one entered).
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (term, int) => {
                if let Some(e) = term.err().or(int.err()) {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM/SIGINT; Ctrl-C only");
                }
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
