//! The write-ahead log on real files: recovery from a torn tail, detection of corruption,
//! vote durability, segments and purge.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use nearby_raft::store::LogStore;
use nearby_raft::wal::{record_offsets, segment_files, Wal, WalOptions};
use nearby_raft::{Command, Entry, LogId, Payload, WalError};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};
use tempfile::TempDir;

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Payload::Shard(Command::RegisterUser {
            user: index,
            name: format!("user {index} with a name long enough to fill segments"),
        })),
    }
}

fn open(dir: &Path, segment_bytes: u64) -> Result<(Arc<Wal>, nearby_raft::wal::RecoveryReport), WalError> {
    Wal::open(dir, WalOptions { segment_bytes }).map(|(w, r)| (Arc::new(w), r))
}

async fn write(dir: &Path, segment_bytes: u64, group: u64, indexes: std::ops::RangeInclusive<u64>) {
    let (wal, _) = open(dir, segment_bytes).expect("open");
    let mut log = LogStore::new(wal, group);
    for i in indexes {
        log.blocking_append([entry(i)]).await.expect("append");
    }
}

async fn read_all(wal: &Arc<Wal>, group: u64) -> Vec<u64> {
    let mut log = LogStore::new(Arc::clone(wal), group);
    log.try_get_log_entries(..)
        .await
        .expect("read")
        .iter()
        .map(|e| e.log_id.index)
        .collect()
}

#[tokio::test]
async fn appended_entries_survive_reopen_across_segments() {
    let dir = TempDir::new().expect("tmp");
    write(dir.path(), 1024, 1, 1..=50).await;
    write(dir.path(), 1024, 2, 1..=5).await;
    let files = segment_files(dir.path()).expect("list");
    assert!(files.len() > 3, "expected several segments, got {}", files.len());
    let (wal, report) = open(dir.path(), 1024).expect("reopen");
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(read_all(&wal, 1).await, (1..=50).collect::<Vec<_>>());
    assert_eq!(read_all(&wal, 2).await, (1..=5).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_torn_last_record_is_cut_off_and_the_log_continues() {
    let dir = TempDir::new().expect("tmp");
    write(dir.path(), 1 << 20, 1, 1..=10).await;
    let last = segment_files(dir.path()).expect("list").pop().expect("a segment");
    // A crash mid-write: half a record at the end.
    let bytes = std::fs::read(&last).expect("read");
    let offsets = record_offsets(&bytes);
    let final_record = &bytes[*offsets.last().expect("records")..];
    let mut f = OpenOptions::new().append(true).open(&last).expect("open");
    f.write_all(&final_record[..final_record.len() / 2])
        .expect("tear");
    drop(f);

    let (wal, report) = open(dir.path(), 1 << 20).expect("recovers");
    assert_eq!(report.torn_tail_bytes as usize, final_record.len() / 2);
    assert_eq!(read_all(&wal, 1).await, (1..=10).collect::<Vec<_>>());
    // The log goes on after the cut, and the new entry survives another restart.
    let mut log = LogStore::new(Arc::clone(&wal), 1);
    log.blocking_append([entry(11)])
        .await
        .expect("append after recovery");
    drop(log);
    drop(wal);
    let (wal, report) = open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(report.torn_tail_bytes, 0);
    assert_eq!(read_all(&wal, 1).await, (1..=11).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_torn_write_of_zeros_is_cut_off() {
    let dir = TempDir::new().expect("tmp");
    write(dir.path(), 1 << 20, 1, 1..=3).await;
    let last = segment_files(dir.path()).expect("list").pop().expect("a segment");
    let mut f = OpenOptions::new().append(true).open(&last).expect("open");
    f.write_all(&[0u8; 4096]).expect("zeros");
    drop(f);
    let (wal, report) = open(dir.path(), 1 << 20).expect("recovers");
    assert_eq!(report.torn_tail_bytes, 4096);
    assert_eq!(read_all(&wal, 1).await, vec![1, 2, 3]);
}

fn flip_byte_of_record(path: &Path, record: usize) -> usize {
    let mut bytes = std::fs::read(path).expect("read");
    let offsets = record_offsets(&bytes);
    let at = offsets[record] + nearby_raft::wal::RECORD_HEADER_BYTES + 2;
    bytes[at] ^= 0x20;
    std::fs::write(path, &bytes).expect("write");
    offsets[record]
}

#[tokio::test]
async fn a_corrupted_record_in_the_middle_is_reported_not_applied() {
    let dir = TempDir::new().expect("tmp");
    write(dir.path(), 1 << 20, 1, 1..=10).await;
    let last = segment_files(dir.path()).expect("list").pop().expect("a segment");
    // Record 0 is the segment's checkpoint; damage entry 5, which valid records follow.
    let offset = flip_byte_of_record(&last, 5);
    match open(dir.path(), 1 << 20) {
        Err(WalError::Corruption { path, offset: at, .. }) => {
            assert_eq!(path, last);
            assert_eq!(at, offset as u64);
        }
        Err(e) => panic!("expected corruption, got {e}"),
        Ok(_) => panic!("a corrupted log was opened"),
    }
}

#[tokio::test]
async fn a_corrupted_record_in_a_sealed_segment_is_reported() {
    let dir = TempDir::new().expect("tmp");
    write(dir.path(), 1024, 1, 1..=40).await;
    let files = segment_files(dir.path()).expect("list");
    assert!(files.len() > 2);
    // Even the last record of a sealed segment is acknowledged data, not a torn tail.
    let sealed = &files[0];
    let n = record_offsets(&std::fs::read(sealed).expect("read")).len();
    flip_byte_of_record(sealed, n - 1);
    assert!(matches!(open(dir.path(), 1024), Err(WalError::Corruption { .. })));
}

#[tokio::test]
async fn the_vote_is_durable_and_truncate_and_purge_persist() {
    let dir = TempDir::new().expect("tmp");
    {
        let (wal, _) = open(dir.path(), 1024).expect("open");
        let mut log = LogStore::new(Arc::clone(&wal), 9);
        log.save_vote(&openraft::Vote::new(4, 2)).await.expect("vote");
        for i in 1..=30 {
            log.blocking_append([entry(i)]).await.expect("append");
        }
        log.truncate(LogId::new(CommittedLeaderId::new(1, 1), 25))
            .await
            .expect("truncate");
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 10))
            .await
            .expect("purge");
    }
    let (wal, _) = open(dir.path(), 1024).expect("reopen");
    let mut log = LogStore::new(Arc::clone(&wal), 9);
    assert_eq!(
        log.read_vote().await.expect("read vote"),
        Some(openraft::Vote::new(4, 2))
    );
    assert_eq!(read_all(&wal, 9).await, (11..=24).collect::<Vec<_>>());
    let state = log.get_log_state().await.expect("state");
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(10));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(24));
}

#[tokio::test]
async fn a_second_host_on_the_same_directory_is_refused() {
    let dir = TempDir::new().expect("tmp");
    let ca = nearby_raft::transport::ClusterCa::generate("t").expect("ca");
    let cfg = |ca: &nearby_raft::transport::ClusterCa| {
        nearby_raft::HostConfig::new(
            1,
            dir.path(),
            "127.0.0.1:0".parse().expect("addr"),
            ca.issue_node(1).expect("tls"),
        )
    };
    let first = nearby_raft::RaftHost::start(cfg(&ca)).await.expect("first");
    assert!(nearby_raft::RaftHost::start(cfg(&ca)).await.is_err());
    first.shutdown().await;
}
