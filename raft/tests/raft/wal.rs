//! The write-ahead log on real files: recovery from a torn tail, detection of corruption,
//! vote durability, segments and purge, and a disk that fills up for real (a small tmpfs).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nearby_raft::store::LogStore;
use nearby_raft::test_support::{fill, SmallDisk};
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
    Wal::open(
        dir,
        WalOptions {
            segment_bytes,
            ..WalOptions::default()
        },
    )
    .map(|(w, r)| (Arc::new(w), r))
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

/// A small tmpfs for one test (root: CI is), in a temporary directory removed after it is
/// unmounted (fields drop in order).
struct TestDisk {
    disk: SmallDisk,
    _dir: TempDir,
}

impl TestDisk {
    fn new(bytes: u64) -> TestDisk {
        let dir = TempDir::new().expect("tmp");
        let disk = SmallDisk::mount(dir.path(), bytes).expect("this test fills a disk it mounts");
        TestDisk { disk, _dir: dir }
    }

    fn path(&self) -> &Path {
        self.disk.path()
    }
}

async fn wait_for<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A full disk neither fails the log's writes (openraft would take that for the end of the
/// replica) nor poisons it: the node is told to refuse new proposals, Raft's writes wait, reads
/// go on, and everything carries on once space returns, with no restart and nothing lost. With
/// 1-byte segments every write starts a new segment, so the full disk meets the roll (a segment
/// file it could not finish is removed and made again later); with 64 KiB ones, the append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_writes_back_without_failing_them_until_space_returns() {
    for segment_bytes in [1, 64 << 10] {
        let disk = TestDisk::new(4 << 20);
        let dir = disk.path().join("wal");
        let opts = WalOptions {
            segment_bytes,
            min_free_bytes: 1 << 20,
        };
        let (wal, _) = Wal::open(&dir, opts.clone()).expect("open");
        let wal = Arc::new(wal);
        let mut log = LogStore::new(Arc::clone(&wal), 1);
        for i in 1..=5 {
            log.blocking_append([entry(i)]).await.expect("append");
        }
        assert_eq!(wal.space_low(), None, "{segment_bytes}: room at first");

        let filler = disk.path().join("filler");
        fill(&filler).expect("fill the disk");
        let why = wait_for("the log to see the disk short of space", || wal.space_low()).await;
        assert!(why.contains("full"), "{segment_bytes}: {why}");

        let writer = tokio::spawn(async move {
            for i in 6..=60 {
                log.blocking_append([entry(i)]).await?;
            }
            Ok::<_, nearby_raft::StorageError>(())
        });
        wait_for("a write to find the disk full", || {
            (wal.stats().no_space > 0).then_some(())
        })
        .await;
        assert!(
            !writer.is_finished(),
            "{segment_bytes}: the write waits for space"
        );
        let read = read_all(&wal, 1).await;
        assert_eq!(&read[..5], &[1, 2, 3, 4, 5], "{segment_bytes}: reads go on");
        assert!(read.len() < 60, "{segment_bytes}: not everything fit");

        std::fs::remove_file(&filler).expect("free the disk");
        tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("the writes go on once there is space")
            .expect("join")
            .expect("no write failed");
        wait_for("the log to see room again", || {
            wal.space_low().is_none().then_some(())
        })
        .await;
        assert_eq!(read_all(&wal, 1).await, (1..=60).collect::<Vec<_>>());

        drop(wal);
        let (wal, report) = Wal::open(&dir, opts).expect("reopens: no half-made segment is left");
        assert_eq!(report.torn_tail_bytes, 0, "{segment_bytes}");
        assert_eq!(read_all(&Arc::new(wal), 1).await, (1..=60).collect::<Vec<_>>());
    }
}

/// A snapshot built while the disk is full waits for space instead of failing (openraft would
/// take a failed build for the end of the replica), and is written once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_built_on_a_full_disk_waits_for_space() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    let disk = TestDisk::new(1 << 20);
    let dir = disk.path().join("sm");
    let range = nearby_index::friends::UserRange::new(1, u64::MAX).expect("range");
    let mut sm =
        nearby_raft::store::StateMachine::open(1, &dir, nearby_raft::GroupState::new(range)).expect("open");
    let filler = disk.path().join("filler");
    fill(&filler).expect("fill the disk");
    let mut builder = sm.get_snapshot_builder().await;
    let mut build = tokio::spawn(async move { builder.build_snapshot().await });
    // A build that gave up would be done at once; this one must still be waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut build)
            .await
            .is_err(),
        "the build must wait for space, not fail"
    );
    let names = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    };
    std::fs::remove_file(&filler).expect("free the disk");
    tokio::time::timeout(Duration::from_secs(10), build)
        .await
        .expect("built once there is space")
        .expect("join")
        .expect("no error");
    assert_eq!(
        names()
            .iter()
            .filter(|n| n.starts_with("snapshot") && !n.ends_with(".tmp"))
            .count(),
        1,
        "{:?}",
        names()
    );
}
