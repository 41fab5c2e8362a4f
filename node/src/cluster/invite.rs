//! Adding a node by invitation (`nodectl add-node ADDR`).
//!
//! A new node started with `nearby-node join` and no seeds belongs to nothing yet: it listens on
//! its node-to-node address and waits. Any member, asked by an operator, sends it
//! [`PeerRequest::Invite`] with the Raft addresses of the members that are up; the new node then
//! joins through them exactly as `join SEED` would ([`PeerRequest::Join`] to the meta group's
//! leader), and the member answers the operator once the map lists the node.
//!
//! Both ends prove who they are with certificates of the cluster's CA (the transport's mutual
//! TLS): only a holder of a node certificate can invite, and only a node issued by the same CA
//! can be invited. The member first asks with `dry_run` (the new node answers with its id and
//! addresses and does nothing), so an id already in the map is refused before the node acts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nearby_raft::meta::NodeState;
use nearby_raft::{NodeId, NodeInfo};
use tokio::sync::oneshot;

use super::Cluster;
use crate::route::peer::{PeerRequest, PeerResponse};

/// How long an invitation may take to show the node up in the map.
const JOINED_WITHIN: Duration = Duration::from_secs(60);
/// How long the invited node has to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// How long an invitation waits for a node that does not answer yet (started a moment ago).
const START_WAIT: Duration = Duration::from_secs(5);

/// Where a node stands with invitations.
#[derive(Debug, Default)]
pub(super) enum Invitation {
    /// Not waiting for one: a member, or a node joining through seeds.
    #[default]
    NotWaiting,
    /// Waiting: the seeds go here.
    Waiting(oneshot::Sender<Vec<String>>),
    /// Invited (an inviter whose answer was lost may ask again).
    Invited,
}

/// What an invitation did (or, on a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invited {
    /// The node's id, from its certificate.
    pub node: NodeId,
    /// Its addresses.
    pub info: NodeInfo,
    /// What, in words.
    pub what: String,
}

impl Cluster {
    /// On a fresh node: waits for a member's invitation and answers with its seeds.
    pub(super) async fn await_invitation(&self) -> Vec<String> {
        let (tx, mut rx) = oneshot::channel();
        *self.invitation.lock().unwrap_or_else(|p| p.into_inner()) = Invitation::Waiting(tx);
        tracing::info!(
            node = self.me,
            raft = %self.info.raft,
            "waiting to be added to a cluster: run `nodectl add-node {}` against it",
            self.info.raft
        );
        loop {
            match tokio::time::timeout(Duration::from_secs(30), &mut rx).await {
                Ok(Ok(seeds)) => return seeds,
                // The sender lives in `self.invitation` until an invitation takes it.
                Ok(Err(_)) => std::future::pending::<()>().await,
                Err(_) => {
                    tracing::info!(raft = %self.info.raft, "still waiting to be added (`nodectl add-node`)")
                }
            }
        }
    }

    /// Answers an invitation from `from` (see the module doc).
    pub(super) fn answer_invitation(&self, from: NodeId, seeds: Vec<String>, dry_run: bool) -> PeerResponse {
        let mut state = self.invitation.lock().unwrap_or_else(|p| p.into_inner());
        let accepted = PeerResponse::Invited {
            node: self.me,
            info: self.info.clone(),
        };
        match std::mem::take(&mut *state) {
            Invitation::Waiting(tx) if !dry_run => {
                tracing::info!(by = from, ?seeds, "invited: joining");
                let _ = tx.send(seeds);
                *state = Invitation::Invited;
                accepted
            }
            Invitation::Invited => {
                *state = Invitation::Invited;
                accepted
            }
            waiting @ Invitation::Waiting(_) => {
                *state = waiting;
                accepted
            }
            Invitation::NotWaiting => PeerResponse::Failed(match self.identity.cluster() {
                Ok(Some(id)) => format!("node {} is already a member of cluster {id}", self.me),
                _ => format!(
                    "node {} is not waiting for an invitation (it was started to join through seeds, or to restart)",
                    self.me
                ),
            }),
        }
    }

    /// Invites the node at `addr` (its node-to-node address) into the cluster and waits until
    /// the map lists it up; with `dry_run`, only asks it who it is.
    pub async fn invite(self: &Arc<Self>, addr: &str, dry_run: bool) -> Result<Invited, String> {
        let socket: SocketAddr = tokio::net::lookup_host(addr)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                format!("cannot resolve {addr:?} (give the node's node-to-node address, host:port)")
            })?;
        let map = self.directory.view().map.clone();
        if let Some((id, _)) = map.nodes.iter().find(|(_, n)| n.info.raft == addr) {
            return Err(format!("{addr} is already node {id} of this cluster"));
        }
        let mut seeds: Vec<String> = map
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Up)
            .map(|n| n.info.raft.clone())
            .collect();
        // This node first: it answered the operator, so it is reachable.
        seeds.retain(|s| *s != self.info.raft);
        seeds.insert(0, self.info.raft.clone());
        let ask = |dry_run: bool| {
            let req = PeerRequest::Invite {
                seeds: seeds.clone(),
                dry_run,
            };
            let peers = Arc::clone(self.router.peers());
            async move {
                // `Err((true, _))`: no answer (the node may still be starting).
                match peers.call_addr_within(socket, None, &req, ANSWER_WITHIN).await {
                    Ok(PeerResponse::Invited { node, info }) => Ok((node, info)),
                    Ok(PeerResponse::Failed(why)) => Err((false, format!("{addr} refused: {why}"))),
                    Ok(other) => Err((false, format!("{addr} answered {other:?}"))),
                    Err(e) => Err((true, format!(
                        "{addr} did not answer: {e} (is it running `nearby-node join` with no seeds, on this address, with a certificate of this cluster's CA?)"
                    ))),
                }
            }
        };
        // A node started a moment ago may not serve peer messages yet: the operator who starts
        // it and adds it in the next command is not refused for that.
        let deadline = tokio::time::Instant::now() + START_WAIT;
        let (node, info) = loop {
            match ask(true).await {
                Ok(found) => break found,
                Err((true, _)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((_, why)) => return Err(why),
            }
        };
        if let Some(known) = map.nodes.get(&node) {
            return Err(format!(
                "node id {node} is already a member (at {}); a node that lost its data joins under a new id",
                known.info
            ));
        }
        let what = format!(
            "node {node} (raft {}, client {}, admin {})",
            info.raft,
            info.client,
            if info.admin.is_empty() {
                "none"
            } else {
                &info.admin
            }
        );
        if dry_run {
            return Ok(Invited {
                node,
                info,
                what: format!("would add {what}"),
            });
        }
        ask(false).await.map_err(|(_, why)| why)?;
        let mut watch = self.directory.watch();
        let joined = tokio::time::timeout(JOINED_WITHIN, async {
            loop {
                if watch
                    .borrow_and_update()
                    .map
                    .nodes
                    .get(&node)
                    .is_some_and(|n| n.state == NodeState::Up)
                {
                    return true;
                }
                if watch.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match joined {
            Ok(true) => {
                tracing::info!(node, addr, "operator: node added");
                Ok(Invited {
                    node,
                    info,
                    what: format!("added {what}; placement gives it replicas and leaders from now on"),
                })
            }
            _ => Err(format!(
                "{what} accepted the invitation but is not in the map after {JOINED_WITHIN:?}: see its log"
            )),
        }
    }
}
