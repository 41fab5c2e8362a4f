//! Operations in flight: the operator steps (`transfer`, `move`, `split`, `merge`, `rebalance`)
//! a node is carrying out, with their progress, and the groups they hold.
//!
//! An operation runs on the node that took it (the meta group's leader when it started), as a
//! task of its own; the admin API asks every node for its list, so any node shows all of them.
//! While an operation runs, the groups it changes are *held*: placement plans nothing for them
//! (it would otherwise see a move's extra replica as one too many and remove it, or move a
//! transferred leadership on before the transfer saw it arrive), and a second operation on the
//! same group is refused. A held group is released when the operation ends, however it ends (the
//! handle releases it when dropped).
//!
//! The other way round, placement *claims* the groups of the round it is taking
//! ([`Operations::claim_for_placement`], leaving out any an operation has held since the round was
//! planned), and an operation on a claimed group waits for the round's steps to finish before it
//! starts: the two never change one group at once.
//!
//! Finished operations are kept for a while ([`KEEP_FINISHED`] of them) so a tool that polls
//! sees how its operation ended.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nearby_raft::{GroupId, NodeId};
use serde::{Deserialize, Serialize};

/// Finished operations remembered per node.
pub const KEEP_FINISHED: usize = 32;

/// How an operation stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    /// Still going.
    Running,
    /// Finished as asked.
    Done,
    /// Stopped; the reason. Steps already taken stay taken (each leaves the cluster whole).
    Failed(String),
}

/// One operation, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationView {
    /// `NODE-SEQ`: unique in the cluster (the node that runs it, then its own count).
    pub id: String,
    /// `transfer`, `move`, `split`, `merge`, `rebalance`.
    pub kind: String,
    /// What it does, in words.
    pub what: String,
    /// The groups it holds.
    pub groups: Vec<GroupId>,
    /// Steps finished.
    pub done_steps: u32,
    /// Steps planned (may grow while it runs).
    pub total_steps: u32,
    /// The step it is on, in words.
    pub current: String,
    /// How it stands.
    pub state: OperationState,
    /// When it started, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Seconds it has run (or ran).
    pub elapsed_s: f64,
}

struct Entry {
    view: OperationView,
    started: Instant,
}

#[derive(Default)]
struct Inner {
    next: u64,
    running: Vec<Entry>,
    finished: VecDeque<OperationView>,
    /// Groups placement's current round is changing.
    placing: BTreeSet<GroupId>,
}

impl Inner {
    fn held(&self) -> BTreeSet<GroupId> {
        self.running
            .iter()
            .flat_map(|e| e.view.groups.iter().copied())
            .collect()
    }
}

/// This node's operations (see the module doc).
#[derive(Clone)]
pub struct Operations {
    me: NodeId,
    inner: Arc<Mutex<Inner>>,
    /// Told when placement releases its claim.
    placed: Arc<tokio::sync::Notify>,
}

impl Operations {
    /// An empty registry for node `me`.
    pub fn new(me: NodeId) -> Self {
        Operations {
            me,
            inner: Arc::default(),
            placed: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an operation holding `groups` once placement's round has finished with them (for at
    /// most `within`), or says which running operation holds one of them.
    pub async fn start(
        &self,
        kind: &str,
        what: String,
        groups: impl IntoIterator<Item = GroupId>,
        total_steps: u32,
        within: Duration,
    ) -> Result<Operation, String> {
        let groups: BTreeSet<GroupId> = groups.into_iter().collect();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let placed = self.placed.notified();
            tokio::pin!(placed);
            placed.as_mut().enable();
            match self.try_start(kind, &what, &groups, total_steps) {
                Ok(op) => return Ok(op),
                Err(Busy::Operation(why)) => return Err(why),
                Err(Busy::Placing(g)) => {
                    if tokio::time::timeout_at(deadline, placed).await.is_err() {
                        return Err(format!(
                            "placement has been changing group {g} for {within:?}: try again once it settles"
                        ));
                    }
                }
            }
        }
    }

    fn try_start(
        &self,
        kind: &str,
        what: &str,
        groups: &BTreeSet<GroupId>,
        total_steps: u32,
    ) -> Result<Operation, Busy> {
        let mut inner = self.lock();
        if let Some(g) = inner.placing.intersection(groups).next() {
            return Err(Busy::Placing(*g));
        }
        if let Some(other) = inner
            .running
            .iter()
            .find(|e| e.view.groups.iter().any(|g| groups.contains(g)))
        {
            return Err(Busy::Operation(format!(
                "operation {} ({}) is changing group(s) {:?}: wait for it to finish",
                other.view.id, other.view.what, other.view.groups
            )));
        }
        inner.next += 1;
        let id = format!("{}-{}", self.me, inner.next);
        let started_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        inner.running.push(Entry {
            view: OperationView {
                id: id.clone(),
                kind: kind.to_string(),
                what: what.to_string(),
                groups: groups.iter().copied().collect(),
                done_steps: 0,
                total_steps,
                current: "starting".into(),
                state: OperationState::Running,
                started_ms,
                elapsed_s: 0.0,
            },
            started: Instant::now(),
        });
        Ok(Operation {
            ops: self.clone(),
            id,
            ended: false,
        })
    }

    /// Claims `groups` for placement's round, less those a running operation holds (one may have
    /// started since the round was planned on [`Operations::held`]). Operations on the claimed
    /// groups wait until the claim is dropped.
    pub fn claim_for_placement(&self, groups: impl IntoIterator<Item = GroupId>) -> PlacementClaim {
        let mut inner = self.lock();
        let held = inner.held();
        let groups: BTreeSet<GroupId> = groups.into_iter().filter(|g| !held.contains(g)).collect();
        inner.placing.extend(groups.iter().copied());
        PlacementClaim {
            ops: self.clone(),
            groups,
        }
    }

    /// The groups running operations hold.
    pub fn held(&self) -> BTreeSet<GroupId> {
        self.lock().held()
    }

    /// Running operations first, then the finished ones, newest first.
    pub fn list(&self) -> Vec<OperationView> {
        let inner = self.lock();
        let running = inner.running.iter().map(|e| {
            let mut v = e.view.clone();
            v.elapsed_s = e.started.elapsed().as_secs_f64();
            v
        });
        running.chain(inner.finished.iter().rev().cloned()).collect()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut OperationView)) {
        let mut inner = self.lock();
        if let Some(e) = inner.running.iter_mut().find(|e| e.view.id == id) {
            f(&mut e.view);
        }
    }

    fn end(&self, id: &str, state: OperationState) {
        let mut inner = self.lock();
        let Some(at) = inner.running.iter().position(|e| e.view.id == id) else {
            return;
        };
        let entry = inner.running.remove(at);
        let mut view = entry.view;
        view.elapsed_s = entry.started.elapsed().as_secs_f64();
        if view.state == OperationState::Running {
            view.state = state;
        }
        if matches!(view.state, OperationState::Done) {
            view.done_steps = view.total_steps.max(view.done_steps);
            view.current = "done".into();
        }
        match &view.state {
            OperationState::Failed(why) => {
                tracing::warn!(id = %view.id, what = %view.what, why, "operation failed")
            }
            _ => tracing::info!(id = %view.id, what = %view.what, secs = view.elapsed_s, "operation done"),
        }
        inner.finished.push_back(view);
        while inner.finished.len() > KEEP_FINISHED {
            inner.finished.pop_front();
        }
    }
}

/// Why an operation cannot start yet.
enum Busy {
    /// A running operation holds one of its groups: refused, with the reason.
    Operation(String),
    /// Placement's round is changing this group: wait.
    Placing(GroupId),
}

/// The groups placement's round is changing; released when dropped.
pub struct PlacementClaim {
    ops: Operations,
    groups: BTreeSet<GroupId>,
}

impl PlacementClaim {
    /// Whether the round may change `group`.
    pub fn covers(&self, group: GroupId) -> bool {
        self.groups.contains(&group)
    }
}

impl Drop for PlacementClaim {
    fn drop(&mut self) {
        let mut inner = self.ops.lock();
        for g in &self.groups {
            inner.placing.remove(g);
        }
        drop(inner);
        self.ops.placed.notify_waiters();
    }
}

/// A running operation's handle: reports progress; ends it (failed, if not said otherwise)
/// when dropped.
pub struct Operation {
    ops: Operations,
    id: String,
    ended: bool,
}

impl Operation {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next step begins.
    pub fn step(&self, current: impl Into<String>) {
        let current = current.into();
        tracing::info!(id = %self.id, step = %current, "operation step");
        self.ops.update(&self.id, |v| v.current = current);
    }

    /// A step finished.
    pub fn stepped(&self) {
        self.ops.update(&self.id, |v| {
            v.done_steps += 1;
            v.total_steps = v.total_steps.max(v.done_steps);
        });
    }

    /// More steps than planned.
    pub fn add_steps(&self, n: u32) {
        self.ops.update(&self.id, |v| v.total_steps += n);
    }

    /// Ends it: done, or failed with the reason.
    pub fn finish(mut self, outcome: Result<(), String>) {
        self.ended = true;
        let state = match outcome {
            Ok(()) => OperationState::Done,
            Err(why) => OperationState::Failed(why),
        };
        self.ops.end(&self.id, state);
    }
}

impl Drop for Operation {
    fn drop(&mut self) {
        if !self.ended {
            self.ops.end(
                &self.id,
                OperationState::Failed("stopped before it finished".into()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAIT: Duration = Duration::ZERO;

    #[tokio::test]
    async fn a_held_group_refuses_a_second_operation_until_the_first_ends() {
        let ops = Operations::new(3);
        let a = ops
            .start("move", "move 5".into(), [5], 3, NO_WAIT)
            .await
            .expect("first");
        assert_eq!(a.id(), "3-1");
        let refused = ops.start("split", "split 5".into(), [5, 9], 1, NO_WAIT).await;
        assert!(refused.is_err_and(|e| e.contains("3-1")));
        assert_eq!(ops.held(), BTreeSet::from([5]));
        a.step("adding");
        a.stepped();
        a.finish(Ok(()));
        assert!(ops.held().is_empty());
        let b = ops
            .start("split", "split 5".into(), [5, 9], 1, NO_WAIT)
            .await
            .expect("free again");
        drop(b);
        let list = ops.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, "3-2");
        assert!(
            matches!(list[0].state, OperationState::Failed(_)),
            "dropped = failed"
        );
        assert_eq!(list[1].state, OperationState::Done);
        assert_eq!(list[1].done_steps, 3, "done fills the bar");
    }

    #[tokio::test]
    async fn placement_claims_only_groups_no_operation_holds_and_operations_wait_for_its_round() {
        let ops = Operations::new(1);
        let transfer = ops
            .start("transfer", "transfer 2".into(), [2], 1, NO_WAIT)
            .await
            .expect("nothing placing");
        // A round planned before the transfer started: group 2 is left to the transfer.
        let claim = ops.claim_for_placement([2, 4]);
        assert!(!claim.covers(2) && claim.covers(4));
        transfer.finish(Ok(()));

        // An operation on a claimed group is refused once its wait is over ...
        let late = ops
            .start("split", "split 4".into(), [4], 1, Duration::from_millis(20))
            .await;
        assert!(late.is_err_and(|e| e.contains("placement") && e.contains("group 4")));
        assert!(ops.held().is_empty(), "a refused operation holds nothing");

        // ... and starts as soon as the round lets go of it.
        let waiting = tokio::spawn({
            let ops = ops.clone();
            async move {
                ops.start("split", "split 4".into(), [4], 1, Duration::from_secs(30))
                    .await
                    .map(|op| op.id().to_string())
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "it waits while the round holds group 4");
        drop(claim);
        let started = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("started once the claim was dropped")
            .expect("no panic");
        assert_eq!(started.as_deref(), Ok("1-2"));
        // Dropped with the task: the split ended (failed), so the group is free again.
        let claim = ops.claim_for_placement([4]);
        assert!(claim.covers(4));
    }
}
