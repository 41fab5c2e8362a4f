//! Answers peers: the node side of every [`PeerRequest`].
//!
//! The transport has already checked that the request comes from the node it names. A request
//! routed by the map and carrying an older epoch than this node's is answered with this node's
//! map and nothing else ([`PeerResponse::Stale`]); a request for a group this node does not lead
//! is answered with the leader it knows ([`PeerResponse::NotLeader`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use nearby_raft::transport::{PeerHandler, PeerReply};
use nearby_raft::{GroupId, NodeId, Payload, ProposeError, META_GROUP};

use super::Cluster;
use crate::route::peer::{HistoryOp, PeerRequest, PeerResponse};
use nearby_index::geo::Millis;

/// The node's handler of peer messages.
pub struct Inbound {
    cluster: Weak<Cluster>,
}

impl Inbound {
    /// A handler answering for `cluster`.
    pub fn new(cluster: Weak<Cluster>) -> Self {
        Inbound { cluster }
    }
}

impl PeerHandler for Inbound {
    fn handle(&self, from: NodeId, message: Vec<u8>) -> PeerReply {
        let cluster = self.cluster.upgrade();
        Box::pin(async move {
            let response = match (cluster, nearby_index::codec::decode::<PeerRequest>(&message)) {
                (None, _) => PeerResponse::Failed("the node is stopping".into()),
                (_, Err(e)) => PeerResponse::Failed(format!("undecodable request: {e}")),
                (Some(c), Ok(req)) => answer(&c, from, req).await,
            };
            nearby_index::codec::encode(&response).unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot encode a peer answer");
                Vec::new()
            })
        })
    }
}

/// `Stale` with this node's map if `epoch` is older than it.
/// How long a compaction asked by a peer may take.
const COMPACT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn stale(c: &Cluster, epoch: u64) -> Option<PeerResponse> {
    let view = c.directory().view();
    (epoch < view.map.epoch).then(|| PeerResponse::Stale(Box::new(view.map.clone())))
}

fn not_leader(c: &Cluster, group: GroupId) -> PeerResponse {
    let raft = if group == META_GROUP {
        c.host().meta().map(|m| m.raft().clone())
    } else {
        c.host().shard(group).map(|g| g.raft().clone())
    };
    let (leader, term) = match raft {
        Some(r) => {
            let m = r.server_metrics().borrow().clone();
            (m.current_leader, m.vote.leader_id().get_term())
        }
        None => (c.directory().leader(group), 0),
    };
    PeerResponse::NotLeader { group, leader, term }
}

async fn answer(c: &Arc<Cluster>, from: NodeId, req: PeerRequest) -> PeerResponse {
    match req {
        PeerRequest::Deliver { epoch, envelopes } => {
            if let Some(s) = stale(c, epoch) {
                return s;
            }
            PeerResponse::Delivered {
                bounced: c.router().deliver_local(envelopes),
            }
        }
        PeerRequest::Propose {
            epoch,
            group,
            payload,
        } => {
            if let Some(s) = stale(c, epoch) {
                return s;
            }
            if !c.router().leads(group) {
                return not_leader(c, group);
            }
            match c.router().propose_here(group, payload).await {
                Ok((index, reply)) => PeerResponse::Proposed { index, reply },
                Err(ProposeError::Invalid(e)) => PeerResponse::Invalid(e),
                Err(ProposeError::NotLeader { .. }) => not_leader(c, group),
                Err(e) => PeerResponse::Failed(e.to_string()),
            }
        }
        PeerRequest::Read { epoch, group, query } => {
            if let Some(s) = stale(c, epoch) {
                return s;
            }
            if !c.router().leads(group) {
                return not_leader(c, group);
            }
            match c.router().read_here(group, &query).await {
                Ok(a) => PeerResponse::Read(a),
                Err(ProposeError::NotLeader { .. }) => not_leader(c, group),
                Err(e) => PeerResponse::Failed(e.to_string()),
            }
        }
        PeerRequest::WatchMap { since, wait_ms } => {
            let mut watch = c.directory().watch();
            let wait = Duration::from_millis(u64::from(wait_ms.min(30_000)));
            let _ = tokio::time::timeout(wait, async {
                while watch.borrow_and_update().map.epoch <= since {
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
            PeerResponse::Map(Box::new(c.directory().view().map.clone()))
        }
        PeerRequest::Join { info } => {
            // A node id is never reused: a node that lost its data must join under a new one
            // (its old votes are gone; reusing the id could let it vote twice in a term).
            if let Some(known) = c.directory().view().map.nodes.get(&from) {
                if known.info != info || !c.directory().view().map.is_bootstrapped() {
                    return PeerResponse::Failed(format!(
                        "node {from} is already a member (at {}); a node that lost its data joins under a new id",
                        known.info
                    ));
                }
                // The same node asking again (its first answer was lost): it is in already.
                return PeerResponse::Map(Box::new(c.directory().view().map.clone()));
            }
            let cmd = nearby_raft::MetaCommand::AddNode { node: from, info };
            match c.router().propose(META_GROUP, Payload::Meta(cmd)).await {
                Ok((_, nearby_raft::Reply::Meta(nearby_raft::MetaResult::Rejected(e)))) => {
                    PeerResponse::Failed(e.to_string())
                }
                Ok(_) => {
                    // Answer with a map that has the new node in it.
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
                    while !c.directory().view().map.nodes.contains_key(&from)
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    tracing::info!(node = from, "node joined");
                    PeerResponse::Map(Box::new(c.directory().view().map.clone()))
                }
                Err(e) => PeerResponse::Failed(e.to_string()),
            }
        }
        PeerRequest::Ping { epoch } => stale(c, epoch).unwrap_or(PeerResponse::Done),
        PeerRequest::AddReplica { epoch, group, node } => {
            if let Some(s) = stale(c, epoch) {
                return s;
            }
            if !c.router().leads(group) {
                return not_leader(c, group);
            }
            c.router().wake_group(group, "a replica added");
            match c.add_replica_here(group, node).await {
                Ok(()) => PeerResponse::Done,
                Err(e) => PeerResponse::Failed(e),
            }
        }
        PeerRequest::RemoveReplica { epoch, group, node } => {
            if let Some(s) = stale(c, epoch) {
                return s;
            }
            if !c.router().leads(group) {
                return not_leader(c, group);
            }
            c.router().wake_group(group, "a replica removed");
            match c.remove_replica_here(group, node).await {
                Ok(()) => PeerResponse::Done,
                Err(e) => PeerResponse::Failed(e),
            }
        }
        PeerRequest::ReplicaState { group, users } => match c.host().shard(group) {
            Some(g) => g.read_applied(|a| PeerResponse::Replica {
                applied: a.last_applied.map_or(0, |l| l.index),
                asleep: c.router().hibernation().is_asleep(group),
                records: users
                    .iter()
                    .filter_map(|u| {
                        a.state
                            .user(*u)
                            .map(|r| (*u, crate::route::peer::RecordView::of(r)))
                    })
                    .collect(),
            }),
            None => PeerResponse::Failed(format!("no replica of group {group} here")),
        },
        PeerRequest::ReplicaGrants { group, users } => match c.host().shard(group) {
            Some(g) => g.read_applied(|a| PeerResponse::Grants {
                applied: a.last_applied.map_or(0, |l| l.index),
                records: users
                    .iter()
                    .filter_map(|u| {
                        a.state.user(*u).map(|r| {
                            let grants = crate::route::peer::GrantsView {
                                followers: r.rare().followers.iter().collect(),
                                following: r.rare().following.iter().collect(),
                            };
                            (*u, grants)
                        })
                    })
                    .collect(),
            }),
            None => PeerResponse::Failed(format!("no replica of group {group} here")),
        },
        PeerRequest::Hibernate { group, term } => {
            let Some(g) = c.host().shard(group) else {
                return PeerResponse::Failed(format!("no replica of group {group} here"));
            };
            let m = g.raft().server_metrics().borrow().clone();
            // Only the leader this replica follows, in its term, puts it to sleep.
            if m.current_leader == Some(from) && m.vote.leader_id().get_term() == term {
                c.router().hibernation().sleep(group, g.raft());
                PeerResponse::Done
            } else {
                PeerResponse::Failed(format!(
                    "node {from} does not lead group {group} in term {term} here"
                ))
            }
        }
        PeerRequest::Wake { group } => {
            c.router().wake_group(group, "the leader's word");
            PeerResponse::Done
        }
        PeerRequest::Campaign { group } => {
            c.router().wake_group(group, "a campaign asked for");
            let raft = if group == META_GROUP {
                c.host().meta().map(|m| m.raft().clone())
            } else {
                c.host().shard(group).map(|g| g.raft().clone())
            };
            match raft {
                Some(r) => campaign(&r, c.me).await,
                None => PeerResponse::Failed(format!("no replica of group {group} here")),
            }
        }
        PeerRequest::History { group, user, op } => {
            let history = c.history();
            let done = match op {
                HistoryOp::Read { since, until, limit } => history
                    .read(group, user, since, until, limit as usize)
                    .await
                    .map(|records| {
                        PeerResponse::History(
                            records
                                .into_iter()
                                .map(|r| (Millis(r.at_ms), r.lat, r.lon))
                                .collect(),
                        )
                    }),
                HistoryOp::Purge { before } => history
                    .purge(group, user, before)
                    .await
                    .map(|_| PeerResponse::Done),
            };
            done.unwrap_or_else(|e| PeerResponse::Failed(e.to_string()))
        }
        PeerRequest::Stats => PeerResponse::Stats(Box::new(c.stats().await)),
        PeerRequest::Operate { step, dry_run } => {
            if !c.router().leads(META_GROUP) {
                return not_leader(c, META_GROUP);
            }
            match c.operate(&step, dry_run).await {
                Ok(done) => PeerResponse::Operated(done),
                Err(why) => PeerResponse::Failed(why),
            }
        }
        PeerRequest::Operations => PeerResponse::Operations(c.operations().list()),
        PeerRequest::Invite { seeds, dry_run } => c.answer_invitation(from, seeds, dry_run),
        PeerRequest::Clock => PeerResponse::Clock {
            now_ms: c.clock().now().0,
        },
        PeerRequest::Compact { group } => match c.host().shard(group) {
            Some(g) if c.router().leads(group) => match g.compact(COMPACT_TIMEOUT).await {
                Ok(_) => PeerResponse::Done,
                Err(e) => PeerResponse::Failed(e.to_string()),
            },
            _ => not_leader(c, group),
        },
        PeerRequest::HandOver { group, to } => {
            if !c.router().leads(group) {
                return not_leader(c, group);
            }
            match c.hand_over_here(group, to).await {
                Ok(()) => PeerResponse::Done,
                Err(why) => PeerResponse::Failed(why),
            }
        }
    }
}

/// How long a campaign asked of this node keeps standing.
const CAMPAIGN_FOR: Duration = Duration::from_secs(2);

/// How often a campaign that has not won stands again.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(100);

/// Stands for election until this node leads (or [`CAMPAIGN_FOR`] passes). openraft 0.9 has no
/// leadership transfer: the first election deposes the leader (it sees the higher term) but is
/// refused by the other followers while their leader lease runs. The deposed leader's own vote is
/// no longer committed, so it grants the next election of a candidate as up to date as it is:
/// standing again soon wins that, before the deposed leader's election timer (400–800 ms) lets it
/// take the group back, which a single campaign loses about half of the time.
///
/// It stops as soon as another replica leads in a newer term than the one it stood from: this
/// node cannot win (its log misses what the others hold), and standing again would only depose
/// the replica that could.
async fn campaign(raft: &nearby_raft::Raft, me: NodeId) -> PeerResponse {
    let deadline = tokio::time::Instant::now() + CAMPAIGN_FOR;
    let mut metrics = raft.metrics();
    let stood_from = metrics.borrow().current_term;
    loop {
        if let Err(e) = raft.trigger().elect().await {
            return PeerResponse::Failed(e.to_string());
        }
        let next = (tokio::time::Instant::now() + CAMPAIGN_EVERY).min(deadline);
        loop {
            let (leader, term) = {
                let m = metrics.borrow();
                (m.current_leader, m.current_term)
            };
            if leader == Some(me) {
                return PeerResponse::Done;
            }
            if let Some(other) = leader.filter(|_| term > stood_from) {
                return PeerResponse::Failed(format!(
                    "node {other} leads the group in term {term}: this replica stopped standing"
                ));
            }
            match tokio::time::timeout_at(next, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return PeerResponse::Failed("the replica closed".into()),
                Err(_) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            // The caller checks the map for the outcome.
            return PeerResponse::Done;
        }
    }
}
