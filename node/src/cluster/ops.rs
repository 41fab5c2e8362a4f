//! Operations in flight: the long operator steps (`move`, `split`, `merge`, `rebalance`) a node
//! is carrying out, with their progress, and the groups they hold.
//!
//! An operation runs on the node that took it (the meta group's leader when it started), as a
//! task of its own; the admin API asks every node for its list, so any node shows all of them.
//! While an operation runs, the groups it changes are *held*: placement plans nothing for them
//! (it would otherwise see a move's extra replica as one too many and remove it), and a second
//! operation on the same group is refused. A held group is released when the operation ends,
//! however it ends (the handle releases it when dropped).
//!
//! Finished operations are kept for a while ([`KEEP_FINISHED`] of them) so a tool that polls
//! sees how its operation ended.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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
    /// `move`, `split`, `merge`, `rebalance`.
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
}

/// This node's operations (see the module doc).
#[derive(Clone)]
pub struct Operations {
    me: NodeId,
    inner: Arc<Mutex<Inner>>,
}

impl Operations {
    /// An empty registry for node `me`.
    pub fn new(me: NodeId) -> Self {
        Operations {
            me,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts an operation holding `groups`, or says which running one holds one of them.
    pub fn start(
        &self,
        kind: &str,
        what: String,
        groups: impl IntoIterator<Item = GroupId>,
        total_steps: u32,
    ) -> Result<Operation, String> {
        let groups: BTreeSet<GroupId> = groups.into_iter().collect();
        let mut inner = self.lock();
        if let Some(other) = inner
            .running
            .iter()
            .find(|e| e.view.groups.iter().any(|g| groups.contains(g)))
        {
            return Err(format!(
                "operation {} ({}) is changing group(s) {:?}: wait for it to finish",
                other.view.id, other.view.what, other.view.groups
            ));
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
                what,
                groups: groups.into_iter().collect(),
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

    /// The groups running operations hold.
    pub fn held(&self) -> BTreeSet<GroupId> {
        self.lock()
            .running
            .iter()
            .flat_map(|e| e.view.groups.iter().copied())
            .collect()
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

    #[test]
    fn a_held_group_refuses_a_second_operation_until_the_first_ends() {
        let ops = Operations::new(3);
        let a = ops.start("move", "move 5".into(), [5], 3).expect("first");
        assert_eq!(a.id(), "3-1");
        let refused = ops.start("split", "split 5".into(), [5, 9], 1);
        assert!(refused.is_err_and(|e| e.contains("3-1")));
        assert_eq!(ops.held(), BTreeSet::from([5]));
        a.step("adding");
        a.stepped();
        a.finish(Ok(()));
        assert!(ops.held().is_empty());
        let b = ops
            .start("split", "split 5".into(), [5, 9], 1)
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
}
