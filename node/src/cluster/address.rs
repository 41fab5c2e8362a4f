//! A node back at new addresses: a rescheduled Kubernetes pod gets a new IP, a host is moved.
//!
//! A node's addresses live in two places: its entry in the cluster map, and — for the Raft
//! groups it holds a replica of — each group's membership, which recorded the addresses the node
//! had when it was added. A node started on its data directory with other addresses than its
//! map entry's proposes its entry again (`AddNode`, which keeps the node's state) until the map
//! shows them ([`Cluster::announce_addresses`]); every node's transport dials a node where the map
//! says it is now ([`address_book`]), so replication follows the map without a membership change.
//! Peers and clients that cached the old address find out through the same map.
//!
//! An address may also be a stable host name (`advertise` in the configuration); the transport
//! looks names up when it dials, so such a node keeps its map entry when only its IP changes.
//!
//! What the nodes speak: each connection agrees on the newest node-to-node protocol version both
//! ends know (`nearby_raft::transport::tls::PEER_PROTOCOL`); the cluster's *active* version is
//! the oldest any node of the map speaks ([`Cluster::active_protocol`]), what a message or
//! command that older nodes could not read waits for.

use std::sync::{Arc, Weak};
use std::time::Duration;

use nearby_raft::meta::MetaCommand;
use nearby_raft::transport::tls::OLDEST_PEER_PROTOCOL;
use nearby_raft::transport::AddressBook;
use nearby_raft::NodeId;

use super::Cluster;
use crate::route::directory::Directory;

/// How long a node waits for its new addresses to show in the map before it proposes them again.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// Where the transport dials node `id`: the node-to-node address of its entry in `directory`'s map.
pub(super) fn address_book(directory: &Arc<Directory>) -> AddressBook {
    let directory: Weak<Directory> = Arc::downgrade(directory);
    Arc::new(move |node| directory.upgrade()?.raft_address(node))
}

/// The version every node speaks: `own`, and each other node's agreed version (one never
/// connected to counts as the oldest this build speaks).
fn active_protocol(own: u32, others: impl IntoIterator<Item = Option<u32>>) -> u32 {
    others
        .into_iter()
        .fold(own, |v, p| v.min(p.unwrap_or(OLDEST_PEER_PROTOCOL)))
}

impl Cluster {
    /// The node-to-node protocol version agreed with `node` (this node's newest for itself).
    pub fn protocol_with(&self, node: NodeId) -> Option<u32> {
        let transport = self.host.transport();
        if node == self.me {
            Some(transport.protocol())
        } else {
            transport.peer_protocol(node)
        }
    }

    /// The newest node-to-node protocol version every node of the map speaks, as far as this
    /// node knows: new messages and Raft commands that older nodes could not read are sent only
    /// once this reaches their version.
    pub fn active_protocol(&self) -> u32 {
        let view = self.directory.view();
        let others = view.map.nodes.keys().filter(|n| **n != self.me);
        active_protocol(
            self.host.transport().protocol(),
            others.map(|n| self.host.transport().peer_protocol(*n)),
        )
    }

    /// Proposes this node's configured addresses until its map entry shows them (see the module
    /// doc). Runs as one of the node's tasks; returns at once when nothing changed, and when the
    /// node is not in the map at all (removed: there is no entry to correct).
    pub(super) async fn announce_addresses(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let known = match self.directory.node(self.me) {
                None => return,
                Some(known) if known == self.info => {
                    if attempt > 0 {
                        tracing::info!(info = %self.info, "the cluster map has this node's new addresses");
                    }
                    return;
                }
                Some(known) => known,
            };
            attempt += 1;
            tracing::info!(
                old = %known,
                new = %self.info,
                attempt,
                "this node's addresses differ from the cluster map's; updating the map"
            );
            let cmd = MetaCommand::AddNode {
                node: self.me,
                info: self.info.clone(),
            };
            if let Err(why) = self.propose_map(cmd).await {
                tracing::info!(%why, "cannot update this node's addresses yet");
                tokio::time::sleep(ANNOUNCE_EVERY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_active_protocol_is_the_oldest_any_node_speaks_and_an_unknown_node_counts_as_the_oldest() {
        assert_eq!(active_protocol(5, []), 5, "alone: its own");
        assert_eq!(active_protocol(5, [Some(5), Some(4)]), 4);
        assert_eq!(
            active_protocol(4, [Some(5), Some(5)]),
            4,
            "this node is the oldest"
        );
        assert_eq!(active_protocol(5, [Some(5), None]), OLDEST_PEER_PROTOCOL.min(5));
    }
}
