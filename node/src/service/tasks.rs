//! The client service on quinn's own tasks: quinn drives each connection in a task of its own,
//! and each session runs in two more (requests, events). It is the simple transport, kept for the
//! original design's baseline and to measure [`super::driver`] against.

use std::sync::Arc;
use std::time::Duration;

use nearby_client::proto::{frame, Event, FrameBuffer, RequestFrame};
use nearby_index::geo::UserId;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::Backend;
use crate::clock::sleep_until;
use crate::metrics::ServiceMetrics;
use crate::queue::{CloseReason, EventQueue, Popped};
use crate::service::session::{
    bad_frame, encode_response, goodbye, since_taken, ConnectionCount, Context, Goodbye, Session, SessionEnd,
    BAD_FRAME_LINGER, CLOSE_DONE, CLOSE_PROTOCOL, GOODBYE_LINGER,
};

/// Accepts connections on `endpoint` until `shutdown`; then tells sessions to go, waits briefly
/// for them, and closes the endpoint.
pub(crate) async fn run<B: Backend>(
    endpoint: quinn::Endpoint,
    ctx: Arc<Context<B>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match ctx.admit() {
                    Some(count) => {
                        sessions.spawn(serve(incoming, count, Arc::clone(&ctx)));
                    }
                    None => incoming.refuse(),
                }
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    tracing::info!(
        sessions = sessions.len(),
        "client service stopping; telling sessions to reconnect"
    );
    ctx.core.close_all(CloseReason::Shutdown);
    let drained = tokio::time::timeout(Duration::from_secs(3), async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        sessions.abort_all();
    }
    endpoint.close(quinn::VarInt::from_u32(CLOSE_DONE), b"shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Serves one incoming connection to its end.
pub(crate) async fn serve<B: Backend>(
    incoming: quinn::Incoming,
    count: ConnectionCount<B>,
    ctx: Arc<Context<B>>,
) {
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    // One deadline for the whole opening: control stream and Hello.
    let hello_by = Instant::now() + ctx.hello_timeout;
    let (send, recv) = match tokio::time::timeout_at(hello_by, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "connection ended before its control stream");
            return;
        }
        Err(_) => {
            conn.close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), b"no control stream");
            return;
        }
    };
    let metrics = Arc::clone(&ctx.metrics);
    let mut session = Session::new(ctx, count, hello_by);
    let mut streams = Streams {
        conn: conn.clone(),
        send,
        out: Vec::new(),
    };
    match streams.run(&mut session, recv, &metrics).await {
        // The client finished its control stream: the session is over once the last answers
        // are out (acknowledged, or after a moment).
        Ok(()) => {
            let _ = streams.send.finish();
            let _ = tokio::time::timeout(BAD_FRAME_LINGER, streams.send.stopped()).await;
            conn.close(quinn::VarInt::from_u32(CLOSE_DONE), b"bye");
        }
        Err(e) => match e.close() {
            Some((code, reason)) => conn.close(quinn::VarInt::from_u32(code), reason.as_bytes()),
            None => tracing::debug!(user = ?session.user(), error = %e, "session ended"),
        },
    }
    session.end().await;
}

/// The control stream of one connection.
struct Streams {
    conn: quinn::Connection,
    send: quinn::SendStream,
    out: Vec<u8>,
}

impl Streams {
    async fn run<B: Backend>(
        &mut self,
        s: &mut Session<B>,
        mut recv: quinn::RecvStream,
        metrics: &Arc<ServiceMetrics>,
    ) -> Result<(), SessionEnd> {
        let mut frames = FrameBuffer::new();
        loop {
            // Chunks are quinn's own buffers: an idle session holds no read buffer of its own.
            // `read_chunk` is cancel-safe: a timer firing first loses no data.
            let read = tokio::select! {
                read = recv.read_chunk(usize::MAX, true) => read,
                () = sleep_until(s.next_timer()) => {
                    s.on_timer()?;
                    continue;
                }
            };
            match read? {
                Some(chunk) => frames.extend(&chunk.bytes),
                None => return Ok(()),
            }
            loop {
                match frames.next_frame::<RequestFrame>() {
                    Ok(Some(f)) => {
                        let opened = s.sink().is_some();
                        let answer = s.answer(f.request).await;
                        if let (false, Some(sink), Some(user)) = (opened, s.sink(), s.user()) {
                            tokio::spawn(write_events(
                                self.conn.clone(),
                                Arc::clone(&sink.events),
                                user,
                                Arc::clone(metrics),
                            ));
                        }
                        if let Some(response) = answer {
                            self.respond(f.id, response).await?;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let (response, reason) = bad_frame(&e);
                        self.respond(0, response).await?;
                        let _ = self.send.finish();
                        // Give the error a moment to reach the client before the close.
                        let _ = tokio::time::timeout(BAD_FRAME_LINGER, self.send.stopped()).await;
                        self.conn
                            .close(quinn::VarInt::from_u32(CLOSE_PROTOCOL), reason.as_bytes());
                        return Err(SessionEnd::Protocol(e));
                    }
                }
            }
        }
    }

    async fn respond(&mut self, id: u64, response: nearby_client::proto::Response) -> Result<(), SessionEnd> {
        self.out.clear();
        if encode_response(id, response, &mut self.out) {
            self.send.write_all(&self.out).await?;
        }
        Ok(())
    }
}

/// Pushes the session's events on a unidirectional stream until the queue closes.
async fn write_events(
    conn: quinn::Connection,
    queue: Arc<EventQueue>,
    user: UserId,
    metrics: Arc<ServiceMetrics>,
) {
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(user, error = %e, "cannot open the event stream");
            return;
        }
    };
    let mut buf = Vec::new();
    loop {
        let event = match queue.pop().await {
            Popped::Event(e) => e,
            Popped::Closed(reason) => {
                close(&conn, &mut stream, user, &reason, &metrics).await;
                return;
            }
        };
        buf.clear();
        if let Err(e) = frame::encode(&event, &mut buf) {
            tracing::error!(user, error = %e, "cannot encode an event");
            continue;
        }
        // A client that stops reading blocks this write (QUIC flow control) while the queue
        // fills behind it; when the queue gives up on the client, so does the write.
        tokio::select! {
            written = stream.write_all(&buf) => {
                if written.is_err() {
                    return;
                }
                metrics.pushed(since_taken(&event));
            }
            () = queue.closed() => {}
        }
    }
}

/// Ends the event stream of a session whose queue closed for `reason`.
async fn close(
    conn: &quinn::Connection,
    stream: &mut quinn::SendStream,
    user: UserId,
    reason: &CloseReason,
    metrics: &ServiceMetrics,
) {
    match goodbye(user, reason, metrics) {
        Goodbye::Quiet => {}
        Goodbye::Notice(bye, why) => {
            let mut buf = Vec::new();
            // A client that stopped reading gets no more than a second of our time.
            let wrote = frame::encode::<Event>(&bye, &mut buf).is_ok()
                && matches!(
                    tokio::time::timeout(GOODBYE_LINGER, stream.write_all(&buf)).await,
                    Ok(Ok(()))
                );
            if wrote {
                let _ = stream.finish();
                let _ = tokio::time::timeout(GOODBYE_LINGER, stream.stopped()).await;
            }
            conn.close(quinn::VarInt::from_u32(CLOSE_DONE), why.as_bytes());
        }
        Goodbye::Close(code, why) => conn.close(quinn::VarInt::from_u32(code), why.as_bytes()),
    }
}
