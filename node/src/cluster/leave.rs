//! Stopping without an election: a node asked to stop (SIGTERM — systemd, Kubernetes, an
//! operator's `kill`) first cordons itself, as `nodectl drain N --leaders-only` would: the meta
//! leader hands its leaderships over one group per placement round, its clients follow them
//! (redirects, no errors), and it keeps its replicas. Once it leads nothing — or after a bound,
//! so a stop never hangs — it stops. It notes in its data directory that the cordon was its own
//! ([`Identity::set_cordoned_for_restart`]); started again, it undrains itself once it is back, so
//! a plain restart needs no operator step. A cordon an operator made is left as it is.
//!
//! Skipped when it cannot help: the node is not up in the map (draining, cordoned by an
//! operator, down), or no other node is up to lead its groups — also while it waits, so a whole
//! cluster stopped at once stops at once.
//!
//! [`Identity::set_cordoned_for_restart`]: super::identity::Identity::set_cordoned_for_restart

use std::sync::Arc;
use std::time::Duration;

use nearby_raft::meta::NodeState;
use tokio::time::Instant;

use super::Cluster;
use crate::route::peer::OperatorStep;

/// How often a node back from a restart tries to undrain itself until it can.
const COME_BACK_EVERY: Duration = Duration::from_millis(500);

impl Cluster {
    /// Hands this node's leaderships over before it stops (see the module doc); returns when it
    /// leads nothing, or when `within` has passed.
    pub async fn hand_over(self: &Arc<Self>, within: Duration) {
        let map = self.directory.view().map.clone();
        let state = map.nodes.get(&self.me).map(|n| n.state);
        if state != Some(NodeState::Up) {
            tracing::info!(
                ?state,
                "stopping without handing leaderships over: the node is not up"
            );
            return;
        }
        if !self.others_up() {
            tracing::info!("stopping without handing leaderships over: no other node is up");
            return;
        }
        if let Err(e) = self.identity.set_cordoned_for_restart(true) {
            tracing::warn!(error = %e, "stopping without handing leaderships over");
            return;
        }
        let started = Instant::now();
        tracing::info!("stopping: handing this node's leaderships over first (cordon)");
        if let Err(why) = self
            .operate_anywhere(&OperatorStep::Cordon { node: self.me }, false)
            .await
        {
            tracing::warn!(%why, "cannot cordon this node; stopping without handing leaderships over");
            if let Err(e) = self.identity.set_cordoned_for_restart(false) {
                tracing::warn!(error = %e, "cannot forget the restart mark");
            }
            return;
        }
        let deadline = started + within;
        let mut watch = self.directory.watch();
        loop {
            let leading = self.leading();
            if leading == 0 {
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "leads nothing now: stopping"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(leading, "handover not finished in time: stopping anyway");
                return;
            }
            if !self.others_up() {
                // The whole cluster is stopping (or the others are leaving too): nobody to
                // hand over to.
                tracing::info!(leading, "no other node is up any more: stopping");
                return;
            }
            tokio::select! {
                _ = watch.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// Whether the map has another node up (one that could lead this node's groups).
    fn others_up(&self) -> bool {
        super::operate::up_besides(&self.directory.view().map, self.me) > 0
    }

    /// Groups (the meta group included) the map says this node leads.
    fn leading(&self) -> usize {
        self.directory
            .view()
            .map
            .groups
            .values()
            .filter(|e| e.leader == Some(self.me))
            .count()
    }

    /// Back from a stop that cordoned this node ([`Cluster::hand_over`]): undrains it once the
    /// cluster answers, then forgets the mark. Runs as one of the node's tasks.
    pub(super) async fn come_back(self: Arc<Self>) {
        if !self.identity.cordoned_for_restart() {
            return;
        }
        loop {
            let state = self.directory.view().map.nodes.get(&self.me).map(|n| n.state);
            let done = match state {
                Some(NodeState::Cordoned) => {
                    match self
                        .operate_anywhere(&OperatorStep::Undrain { node: self.me }, false)
                        .await
                    {
                        Ok(_) => {
                            tracing::info!("back from a restart: up again, leaderships welcome");
                            true
                        }
                        Err(why) => {
                            tracing::debug!(%why, "cannot undrain this node yet");
                            false
                        }
                    }
                }
                // Undrained already, or an operator has changed its state since: theirs to keep.
                Some(NodeState::Up | NodeState::Draining) => true,
                _ => false,
            };
            if done {
                if let Err(e) = self.identity.set_cordoned_for_restart(false) {
                    tracing::warn!(error = %e, "cannot forget the restart mark");
                }
                return;
            }
            tokio::time::sleep(COME_BACK_EVERY).await;
        }
    }
}
