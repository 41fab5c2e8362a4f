//! Delivery of a group's relation intents (see `nearby_raft::shard::state`): each intent the
//! group's outbox holds is proposed to the group of its other side as a `Deliver`, in order per
//! destination, retried until that group has applied it, then forgotten with a `Delivered` in
//! this group.
//!
//! The task runs beside its group's driver, on the leader only, and is woken whenever the group
//! applies a relation change (and once when the driver starts, for intents an earlier leader left).
//! It never holds the group's state while it waits: it reads the outbox, then proposes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nearby_raft::shard::command::Mirror;
use nearby_raft::{Command, CommandError, CommandResult, GroupId, Payload, Reply, ShardGroup};
use tokio::sync::Notify;

use crate::route::router::Router;

/// The longest pause between two attempts at an intent that could not be delivered.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Delivers `group`'s intents until the task is aborted (see the module doc).
pub async fn run(group: ShardGroup, router: Arc<Router>, wake: Arc<Notify>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let failed = deliver_all(&group, &router).await;
        if failed {
            // Something is unreachable: try again after a pause, or sooner if woken.
            let _ = tokio::time::timeout(backoff, wake.notified()).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        } else {
            backoff = Duration::from_millis(50);
            wake.notified().await;
        }
    }
}

/// One pass over the outbox; returns whether an intent is still pending after a failure.
async fn deliver_all(group: &ShardGroup, router: &Router) -> bool {
    let source = group.id();
    let intents: Vec<(u64, Mirror)> = group.read(|s| s.outbox().map(|(seq, m)| (seq, *m)).collect());
    if intents.is_empty() {
        return false;
    }
    // In order per destination group: the last intent applied there is the latest decision.
    let mut by_dest: BTreeMap<GroupId, Vec<(u64, Mirror)>> = BTreeMap::new();
    for (seq, m) in intents {
        match router.directory().group_of(m.user) {
            Some(g) => by_dest.entry(g).or_default().push((seq, m)),
            None => tracing::warn!(group = source, user = m.user, "an intent's user is in no range"),
        }
    }
    let mut failed = false;
    for (dest, list) in by_dest {
        for (seq, mirror) in list {
            let deliver = Payload::Shard(Command::Deliver { source, seq, mirror });
            match router.propose(dest, deliver).await {
                Ok((_, Reply::Shard(r))) => {
                    tracing::debug!(group = source, seq, to = dest, result = %r, "intent delivered");
                }
                Err(e) if e.code == nearby_client::proto::ErrorCode::UnknownUser => {
                    // The other side has no record (never registered): nothing to mirror.
                    tracing::warn!(
                        group = source,
                        seq,
                        to = dest,
                        "intent for an unknown user dropped"
                    );
                }
                Ok((_, other)) => {
                    tracing::error!(group = source, seq, to = dest, reply = %other, "unexpected reply to an intent");
                    failed = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(group = source, seq, to = dest, error = %e, "intent not delivered yet");
                    failed = true;
                    break;
                }
            }
            match group.propose(Command::Delivered { seq }).await {
                Ok(CommandResult::Updated | CommandResult::Unchanged) => {}
                Ok(other) => tracing::warn!(group = source, seq, result = %other, "delivered"),
                Err(nearby_raft::ProposeError::Invalid(CommandError::UnknownUser { .. })) => {}
                Err(e) => {
                    // Not the leader any more, most likely: the next leader delivers again
                    // (harmlessly: the destination applies each intent once).
                    tracing::debug!(group = source, seq, error = %e, "cannot record a delivery");
                    return true;
                }
            }
        }
    }
    failed
}
