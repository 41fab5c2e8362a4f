//! openraft's own store test suite against nearby's WAL-backed log store and state machine.

use std::sync::Arc;

use nearby_index::friends::UserRange;
use nearby_raft::store::{LogStore, StateMachine};
use nearby_raft::wal::{Wal, WalOptions};
use nearby_raft::GroupState;
use nearby_raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageIOError};
use tempfile::TempDir;

struct Builder {
    segment_bytes: u64,
}

impl StoreBuilder<TypeConfig, LogStore, StateMachine<GroupState>, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine<GroupState>), StorageError> {
        let io = |e: &dyn std::error::Error| StorageError::from(StorageIOError::write(AnyError::error(e)));
        let dir = TempDir::new().map_err(|e| io(&e))?;
        let (wal, _) = Wal::open(
            &dir.path().join("wal"),
            WalOptions {
                segment_bytes: self.segment_bytes,
                ..WalOptions::default()
            },
        )
        .map_err(|e| io(&e))?;
        let range = UserRange::new(1, u64::MAX).map_err(|e| io(&e))?;
        let sm = StateMachine::open(1, &dir.path().join("sm"), GroupState::new(range)).map_err(|e| io(&e))?;
        Ok((dir, LogStore::new(Arc::new(wal), 1), sm))
    }
}

#[test]
fn log_store_and_state_machine_pass_openraft_suite() {
    Suite::test_all(Builder {
        segment_bytes: 64 << 20,
    })
    .expect("suite");
}

#[test]
fn openraft_suite_passes_with_tiny_segments() {
    // Every few records roll a segment, so reads cross sealed (memory-mapped) segments and
    // purges delete files.
    Suite::test_all(Builder { segment_bytes: 256 }).expect("suite");
}
