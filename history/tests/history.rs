//! Integration tests of the history store on real files in a temp dir: reads across sealed and
//! active segments, retention, real deletion, torn-tail recovery, input validation, and a
//! property test against an in-memory model.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nearby_history::{HistoryError, HistoryStore, Record, StoreConfig};
use proptest::prelude::*;

const DAY: u64 = 86_400_000;

/// A record whose coordinates are derived from its user and time, so mix-ups show.
fn rec(user: u64, at_ms: u64) -> Record {
    Record {
        user,
        at_ms,
        lat: ((user.wrapping_mul(7).wrapping_add(at_ms)) % 180) as f64 - 90.0 + 0.125,
        lon: ((user.wrapping_mul(13).wrapping_add(at_ms / 3)) % 360) as f64 - 180.0 + 0.5,
    }
}

/// Small segments so a few hundred records span several of them; no age-driven sealing.
fn small_config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 4096,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 1 << 30,
        seal_after: Duration::from_secs(365 * 24 * 3600),
    }
}

/// What the store must return: the model's records of `user` in `[since, until)`, stably sorted
/// by time (equal times in arrival order), at most `limit`.
fn model_read(model: &[Record], user: u64, since: u64, until: u64, limit: usize) -> Vec<Record> {
    let mut out: Vec<Record> = model
        .iter()
        .filter(|r| r.user == user && r.at_ms >= since && r.at_ms < until)
        .copied()
        .collect();
    out.sort_by_key(|r| r.at_ms);
    out.truncate(limit);
    out
}

fn read_all(store: &HistoryStore, user: u64) -> Vec<Record> {
    store.read(user, 0, u64::MAX, usize::MAX).expect("read")
}

/// Every file of the directory with its bytes, sorted by name.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let bytes = fs::read(&path).expect("read file");
            (path, bytes)
        })
        .collect();
    out.sort();
    out
}

fn file_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

fn active_file(dir: &Path) -> PathBuf {
    let actives = file_with_ext(dir, "active");
    assert_eq!(actives.len(), 1, "exactly one active segment: {actives:?}");
    actives[0].clone()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy dir");
    for (path, bytes) in files(from) {
        fs::write(to.join(path.file_name().expect("file name")), bytes).expect("copy file");
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Appends batches of 10 records of 5 interleaved users; within a batch the records are grouped
/// by user, so times arrive out of order across users (each user's stay in order).
fn fill(store: &mut HistoryStore, model: &mut Vec<Record>, batches: u64, t0: u64) {
    for b in 0..batches {
        let mut batch: Vec<Record> = (0..10).map(|i| rec(i % 5, t0 + (b * 10 + i) * 10)).collect();
        batch.sort_by_key(|r| r.user);
        store.append(&batch).expect("append");
        model.extend_from_slice(&batch);
    }
}

#[test]
fn reads_by_range_and_limit_across_sealed_and_active_segments_and_after_reopen() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("group-1");
    let mut model = Vec::new();
    let mut store = HistoryStore::open(&dir, small_config()).expect("open");
    fill(&mut store, &mut model, 60, 1_000);
    let stats = store.stats();
    assert!(stats.sealed_segments >= 3, "{stats:?}");
    assert!(stats.active_records > 0, "{stats:?}");
    assert_eq!(stats.records, model.len() as u64);

    let check = |store: &HistoryStore, model: &[Record]| {
        for user in 0..5 {
            let all = read_all(store, user);
            assert_eq!(all, model_read(model, user, 0, u64::MAX, usize::MAX));
            assert_eq!(all.len(), model.len() / 5);
            // Boundaries: `since` is inclusive, `until` exclusive.
            let (a, b) = (all[7].at_ms, all[all.len() - 3].at_ms);
            let got = store.read(user, a, b, usize::MAX).expect("read");
            assert_eq!(got.first().map(|r| r.at_ms), Some(a));
            assert!(got.iter().all(|r| r.at_ms < b));
            assert_eq!(got, model_read(model, user, a, b, usize::MAX));
            assert_eq!(got.len(), all.len() - 3 - 7);
            assert_eq!(
                store.read(user, a + 1, b + 1, usize::MAX).expect("read"),
                model_read(model, user, a + 1, b + 1, usize::MAX)
            );
            // Limit: the oldest first.
            assert_eq!(
                store.read(user, a, u64::MAX, 5).expect("read"),
                all[7..12].to_vec()
            );
            assert!(store.read(user, a, u64::MAX, 0).expect("read").is_empty());
            assert!(store.read(user, b, a, 10).expect("read").is_empty());
            assert!(store.read(user, a, a, 10).expect("read").is_empty());
        }
        // The last records (in the active segment) and the first ones (in a sealed segment)
        // together in one range.
        let last = model.iter().map(|r| r.at_ms).max().expect("records");
        let got = store.read(3, 0, last + 1, usize::MAX).expect("read");
        assert_eq!(got, model_read(model, 3, 0, last + 1, usize::MAX));
        assert!(store.read(99, 0, u64::MAX, 10).expect("read").is_empty());
    };
    check(&store, &model);

    drop(store);
    let mut store = HistoryStore::open(&dir, small_config()).expect("reopen");
    assert_eq!(store.recovery().torn_tail_bytes, 0);
    assert_eq!(store.stats().records, model.len() as u64);
    check(&store, &model);
    fill(&mut store, &mut model, 20, 100_000);
    check(&store, &model);
}

#[test]
fn creates_its_directory_private_and_refuses_a_second_opener() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("a/b/history");
    let store = HistoryStore::open(&dir, small_config()).expect("open");
    let mode = fs::metadata(&dir).expect("metadata").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    match HistoryStore::open(&dir, small_config()) {
        Err(HistoryError::Locked { path }) => assert_eq!(path, dir),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(store);
    HistoryStore::open(&dir, small_config()).expect("open after the first closed");
}

#[test]
fn the_store_can_move_to_a_blocking_thread() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<HistoryStore>();
}

#[test]
fn invalid_config_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for config in [
        StoreConfig {
            segment_bytes: 64,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_bytes: 2 << 30,
            max_bytes: 4 << 30,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_bytes: 1 << 20,
            max_bytes: 1 << 19,
            ..StoreConfig::default()
        },
    ] {
        assert!(matches!(
            HistoryStore::open(tmp.path(), config),
            Err(HistoryError::InvalidConfig { .. })
        ));
    }
}

#[test]
fn bad_coordinates_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut store = HistoryStore::open(tmp.path(), small_config()).expect("open");
    let mut model = Vec::new();
    fill(&mut store, &mut model, 15, 0);
    let before_files = files(tmp.path());
    let before_stats = store.stats();

    let bad = |lat: f64, lon: f64| Record {
        user: 1,
        at_ms: 5,
        lat,
        lon,
    };
    let cases = [
        (bad(f64::NAN, 0.0), "lat"),
        (bad(90.000_001, 0.0), "lat"),
        (bad(-91.0, 0.0), "lat"),
        (bad(f64::INFINITY, 0.0), "lat"),
        (bad(0.0, f64::NAN), "lon"),
        (bad(0.0, 180.5), "lon"),
        (bad(0.0, f64::NEG_INFINITY), "lon"),
        (bad(0.0, -180.000_1), "lon"),
    ];
    for (record, field) in cases {
        // The bad record is the fourth of the batch: nothing of the batch may be written.
        let batch = [rec(1, 1), rec(2, 2), rec(3, 3), record, rec(4, 4)];
        match store.append(&batch) {
            Err(HistoryError::InvalidRecord {
                index: 3, field: f, ..
            }) => assert_eq!(f, field),
            other => panic!("{record:?}: expected InvalidRecord, got {other:?}"),
        }
    }
    assert_eq!(store.stats(), before_stats);
    assert_eq!(files(tmp.path()), before_files);
    for user in 0..5 {
        assert_eq!(
            read_all(&store, user),
            model_read(&model, user, 0, u64::MAX, usize::MAX)
        );
    }

    // The edges of the valid ranges are accepted.
    let edges = [
        Record {
            user: 9,
            at_ms: 1,
            lat: 90.0,
            lon: 180.0,
        },
        Record {
            user: 9,
            at_ms: 2,
            lat: -90.0,
            lon: -180.0,
        },
    ];
    store.append(&edges).expect("edge coordinates");
    assert_eq!(read_all(&store, 9), edges.to_vec());
    store.append(&[]).expect("an empty batch is a no-op");
}

#[test]
fn retention_by_age_removes_whole_old_segments_while_appends_go_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        segment_bytes: 1 << 20,
        max_age: Duration::from_secs(10 * 24 * 3600),
        max_bytes: 1 << 30,
        seal_after: Duration::from_secs(24 * 3600),
    };
    let mut store = HistoryStore::open(tmp.path(), config.clone()).expect("open");
    let mut model: Vec<Record> = Vec::new();
    // Day d's records lie in [d, d + 12h); each day is sealed by retention the next day.
    let day_batch =
        |d: u64| -> Vec<Record> { (0..12).map(|h| rec(h % 3, d * DAY + h * 3_600_000)).collect() };
    for d in 0..40 {
        // Retention runs an hour into day d, before the day's batch: the active segment then
        // holds exactly day d-1, whose oldest record has just passed seal_after, so each day
        // becomes one sealed segment.
        let now = d * DAY + 3_600_000;
        let stats = store.enforce_retention(now).expect("retention");
        assert_eq!(stats.sealed_active, d >= 1, "day {d}: {stats:?}");
        // A record goes only with its whole segment: day e's segment goes once its newest
        // record (e + 11h) is older than now - max_age.
        let cutoff = now.saturating_sub(10 * DAY);
        let before = model.len();
        model.retain(|r| r.at_ms / DAY * DAY + 11 * 3_600_000 >= cutoff);
        assert_eq!(stats.records_removed, (before - model.len()) as u64, "day {d}");
        assert_eq!(stats.segments_removed, usize::from(d >= 11), "day {d}");

        let batch = day_batch(d);
        store.append(&batch).expect("append between retention runs");
        model.extend_from_slice(&batch);
        for user in 0..3 {
            assert_eq!(
                read_all(&store, user),
                model_read(&model, user, 0, u64::MAX, usize::MAX),
                "day {d}"
            );
        }
        let today = store
            .read(0, d * DAY, (d + 1) * DAY, usize::MAX)
            .expect("read today");
        assert_eq!(today.len(), 4);
    }
    // Days 29..=38 sealed, day 39 active.
    assert_eq!(store.stats().sealed_segments, 10);
    let oldest = (0..3)
        .flat_map(|u| read_all(&store, u))
        .map(|r| r.at_ms)
        .min()
        .expect("records");
    assert_eq!(oldest, 29 * DAY);
    drop(store);
    let store = HistoryStore::open(tmp.path(), config).expect("reopen");
    for user in 0..3 {
        assert_eq!(
            read_all(&store, user),
            model_read(&model, user, 0, u64::MAX, usize::MAX)
        );
    }
}

#[test]
fn retention_seals_and_removes_a_quiet_active_segment() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        max_age: Duration::from_secs(30 * 24 * 3600),
        ..StoreConfig::default()
    };
    let mut store = HistoryStore::open(tmp.path(), config).expect("open");
    store.append(&[rec(1, 0), rec(2, DAY / 2)]).expect("append");
    let stats = store.enforce_retention(DAY / 2).expect("retention");
    assert!(!stats.sealed_active, "younger than seal_after: stays active");
    let stats = store.enforce_retention(2 * DAY).expect("retention");
    assert!(stats.sealed_active);
    assert_eq!(
        (store.stats().sealed_segments, store.stats().active_records),
        (1, 0)
    );
    let stats = store.enforce_retention(30 * DAY + DAY / 2).expect("retention");
    assert_eq!(
        stats.segments_removed, 0,
        "its newest record is exactly 30 days old: kept"
    );
    let stats = store.enforce_retention(31 * DAY).expect("retention");
    assert_eq!((stats.segments_removed, stats.records_removed), (1, 2));
    assert_eq!(store.stats().records, 0);
    assert!(read_all(&store, 1).is_empty());
    store.append(&[rec(1, 31 * DAY)]).expect("append after retention");
    assert_eq!(read_all(&store, 1), vec![rec(1, 31 * DAY)]);
    assert_eq!(file_with_ext(tmp.path(), "seg").len(), 0);
}

#[test]
fn retention_by_size_keeps_the_newest_data_while_appends_go_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        segment_bytes: 4096,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_bytes: 16 * 1024,
        seal_after: Duration::from_secs(365 * 24 * 3600),
    };
    let mut store = HistoryStore::open(tmp.path(), config.clone()).expect("open");
    let mut model: Vec<Record> = Vec::new();
    let mut removed_total = 0;
    for b in 0..200u64 {
        let batch: Vec<Record> = (0..10).map(|i| rec(i % 4, 1_000 + b * 10 + i)).collect();
        store.append(&batch).expect("append");
        model.extend_from_slice(&batch);
        // The clock is the data's own (no age limit is near).
        let stats = store.enforce_retention(1_000 + b * 10 + 10).expect("retention");
        removed_total += stats.records_removed;
        let dir_bytes: u64 = files(tmp.path()).iter().map(|(_, b)| b.len() as u64).sum();
        assert_eq!(store.stats().bytes, dir_bytes);
        assert!(dir_bytes <= config.max_bytes, "batch {b}: {dir_bytes} bytes");
        // What is kept is a suffix of what was written: the oldest segments went first.
        let kept = model.len() as u64 - removed_total;
        let suffix = &model[model.len() - kept as usize..];
        assert_eq!(store.stats().records, kept);
        for user in 0..4 {
            assert_eq!(
                read_all(&store, user),
                model_read(suffix, user, 0, u64::MAX, usize::MAX),
                "batch {b}"
            );
        }
    }
    assert!(removed_total > 1_000, "retention removed {removed_total} records");
    // The newest batch is whole.
    let newest = store
        .read(0, 1_000 + 199 * 10, u64::MAX, usize::MAX)
        .expect("read");
    assert_eq!(newest.len(), 3);
}

const VICTIM: u64 = 0x0123_4567_89ab_cdef;

#[test]
fn delete_user_leaves_no_byte_of_their_records_in_any_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut store = HistoryStore::open(tmp.path(), small_config()).expect("open");
    let mut model: Vec<Record> = Vec::new();
    let mut t = 0;
    let mut append = |store: &mut HistoryStore, model: &mut Vec<Record>, users: &[u64]| {
        let batch: Vec<Record> = users
            .iter()
            .map(|&u| {
                t += 7;
                rec(u, t)
            })
            .collect();
        store.append(&batch).expect("append");
        model.extend_from_slice(&batch);
    };
    // A sealed segment holding only the victim, sealed ones shared with others, and the active one.
    for _ in 0..8 {
        append(&mut store, &mut model, &[VICTIM; 10]);
    }
    store.seal().expect("seal");
    for _ in 0..50 {
        append(&mut store, &mut model, &[1, VICTIM, 2, 3, VICTIM, 4]);
    }
    append(&mut store, &mut model, &[VICTIM, 1]);
    assert!(store.stats().sealed_segments >= 3);
    assert!(store.stats().active_records > 0);
    let victims = model.iter().filter(|r| r.user == VICTIM).count();
    let pattern = VICTIM.to_le_bytes();
    assert!(files(tmp.path()).iter().any(|(_, b)| contains(b, &pattern)));

    let stats = store.delete_user(VICTIM).expect("delete");
    assert_eq!(stats.records_removed, victims as u64);
    assert_eq!(stats.segments_removed, 1, "{stats:?}");
    assert_eq!(
        stats.segments_rewritten, 3,
        "two shared sealed segments and the active one"
    );
    let deleted: Vec<Record> = model.iter().filter(|r| r.user == VICTIM).copied().collect();
    model.retain(|r| r.user != VICTIM);

    let check = |store: &HistoryStore| {
        assert!(read_all(store, VICTIM).is_empty());
        for user in 1..5 {
            assert_eq!(
                read_all(store, user),
                model_read(&model, user, 0, u64::MAX, usize::MAX)
            );
        }
        for (path, bytes) in files(tmp.path()) {
            assert!(
                !contains(&bytes, &pattern),
                "{} still holds the user id",
                path.display()
            );
            for r in &deleted {
                let mut enc = Vec::new();
                enc.extend_from_slice(&r.user.to_le_bytes());
                enc.extend_from_slice(&r.at_ms.to_le_bytes());
                assert!(!contains(&bytes, &enc));
            }
        }
        assert!(file_with_ext(tmp.path(), "tmp").is_empty());
    };
    check(&store);
    assert_eq!(store.stats().records, model.len() as u64);
    // Deleting again finds nothing.
    assert_eq!(
        store.delete_user(VICTIM).expect("delete again").records_removed,
        0
    );
    drop(store);
    let mut store = HistoryStore::open(tmp.path(), small_config()).expect("reopen");
    check(&store);
    // The user can start a new history.
    store.append(&[rec(VICTIM, 1_000_000)]).expect("append");
    assert_eq!(read_all(&store, VICTIM), vec![rec(VICTIM, 1_000_000)]);
}

#[test]
fn delete_before_drops_only_the_older_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut store = HistoryStore::open(tmp.path(), small_config()).expect("open");
    let mut model = Vec::new();
    fill(&mut store, &mut model, 40, 0);
    let all = read_all(&store, 2);
    let before = all[all.len() / 2].at_ms;
    let stats = store.delete_before(2, before).expect("delete_before");
    assert_eq!(stats.records_removed, (all.len() / 2) as u64);
    assert_eq!(read_all(&store, 2), all[all.len() / 2..].to_vec());
    model.retain(|r| !(r.user == 2 && r.at_ms < before));
    for user in 0..5 {
        assert_eq!(
            read_all(&store, user),
            model_read(&model, user, 0, u64::MAX, usize::MAX)
        );
    }
    assert_eq!(
        store
            .delete_before(2, 0)
            .expect("nothing before 0")
            .records_removed,
        0
    );
}

/// A store with two sealed segments and an active segment of three batches; returns the model
/// without the last batch, the active file's length before and after the last batch, and the
/// model with it.
fn torn_fixture(dir: &Path) -> (Vec<Record>, u64, u64, Vec<Record>) {
    let config = StoreConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    };
    let mut store = HistoryStore::open(dir, config).expect("open");
    let mut model = Vec::new();
    fill(&mut store, &mut model, 5, 0);
    store.seal().expect("seal");
    fill(&mut store, &mut model, 5, 10_000);
    store.seal().expect("seal");
    fill(&mut store, &mut model, 2, 20_000);
    let l0 = fs::metadata(active_file(dir)).expect("metadata").len();
    let before = model.clone();
    let last: Vec<Record> = (0..5).map(|i| rec(i, 30_000 + i)).collect();
    store.append(&last).expect("append");
    model.extend_from_slice(&last);
    let l1 = fs::metadata(active_file(dir)).expect("metadata").len();
    assert_eq!(l1 - l0, 16 + 5 * 32);
    (before, l0, l1, model)
}

fn torn_config() -> StoreConfig {
    StoreConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    }
}

#[test]
fn a_torn_last_batch_is_cut_at_every_offset_and_earlier_data_survives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base");
    let (before, l0, l1, _) = torn_fixture(&base);
    let sealed_before: Vec<(PathBuf, Vec<u8>)> = file_with_ext(&base, "seg")
        .into_iter()
        .map(|p| {
            let b = fs::read(&p).expect("read");
            (p.file_name().map(PathBuf::from).expect("name"), b)
        })
        .collect();
    assert_eq!(sealed_before.len(), 2);

    for cut in l0 + 1..l1 {
        let dir = tmp.path().join(format!("cut-{cut}"));
        copy_dir(&base, &dir);
        let active = active_file(&dir);
        fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .and_then(|f| f.set_len(cut))
            .expect("truncate");

        let mut store = HistoryStore::open(&dir, torn_config()).expect("open after a torn write");
        assert_eq!(store.recovery().torn_tail_bytes, cut - l0, "cut at {cut}");
        assert_eq!(fs::metadata(&active).expect("metadata").len(), l0);
        for user in 0..5 {
            assert_eq!(
                read_all(&store, user),
                model_read(&before, user, 0, u64::MAX, usize::MAX),
                "cut {cut}"
            );
        }
        for (name, bytes) in &sealed_before {
            assert_eq!(
                &fs::read(dir.join(name)).expect("read sealed"),
                bytes,
                "sealed segment changed"
            );
        }
        let next = [rec(1, 40_000), rec(2, 40_001)];
        store.append(&next).expect("append after recovery");
        drop(store);
        let store = HistoryStore::open(&dir, torn_config()).expect("reopen");
        assert_eq!(store.recovery().torn_tail_bytes, 0);
        let mut expected = before.clone();
        expected.extend_from_slice(&next);
        for user in 0..5 {
            assert_eq!(
                read_all(&store, user),
                model_read(&expected, user, 0, u64::MAX, usize::MAX)
            );
        }
        drop(store);
        fs::remove_dir_all(&dir).expect("clean up");
    }
}

#[test]
fn a_flipped_byte_in_the_last_batch_is_cut_but_one_in_an_earlier_batch_is_corruption() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("base");
    let (before, l0, l1, _) = torn_fixture(&base);

    for offset in l0..l1 {
        let dir = tmp.path().join(format!("flip-{offset}"));
        copy_dir(&base, &dir);
        let active = active_file(&dir);
        let mut bytes = fs::read(&active).expect("read");
        bytes[offset as usize] ^= 0x40;
        fs::write(&active, &bytes).expect("write");
        let store = HistoryStore::open(&dir, torn_config()).expect("open");
        assert_eq!(store.recovery().torn_tail_bytes, l1 - l0, "flip at {offset}");
        for user in 0..5 {
            assert_eq!(
                read_all(&store, user),
                model_read(&before, user, 0, u64::MAX, usize::MAX)
            );
        }
        drop(store);
        fs::remove_dir_all(&dir).expect("clean up");
    }

    // A flip in the first batch of the active segment, followed by intact batches: not a torn
    // write. Open refuses and changes nothing.
    let dir = tmp.path().join("flip-middle");
    copy_dir(&base, &dir);
    let active = active_file(&dir);
    let mut bytes = fs::read(&active).expect("read");
    bytes[64 + 16 + 40] ^= 0x01;
    fs::write(&active, &bytes).expect("write");
    let before_files = files(&dir);
    match HistoryStore::open(&dir, torn_config()) {
        Err(HistoryError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, active);
            assert_eq!(offset, 64);
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(files(&dir), before_files);
}

#[test]
fn a_damaged_sealed_segment_is_reported_never_repaired() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig {
        segment_bytes: 1 << 20,
        ..small_config()
    };
    let mut store = HistoryStore::open(tmp.path(), config.clone()).expect("open");
    let mut model = Vec::new();
    // Segment 1: 200 records of users 1..=4, 50 each; sorted, block 0 holds users 1 and 2 only.
    for b in 0..20u64 {
        let batch: Vec<Record> = (0..10).map(|i| rec(1 + i % 4, b * 10 + i)).collect();
        store.append(&batch).expect("append");
        model.extend_from_slice(&batch);
    }
    store.seal().expect("seal");
    // Segment 2: other data.
    fill(&mut store, &mut model, 3, 10_000);
    store.seal().expect("seal");
    drop(store);
    let segs = file_with_ext(tmp.path(), "seg");
    assert_eq!(segs.len(), 2);

    // A flipped byte in a record of block 0: found when the block is read.
    let mut bytes = fs::read(&segs[0]).expect("read");
    bytes[64 + 8] ^= 0x01;
    fs::write(&segs[0], &bytes).expect("write");
    let mut store = HistoryStore::open(tmp.path(), config.clone()).expect("open");
    assert!(store.recovery().corrupt_segments.is_empty());
    assert!(matches!(
        store.read(1, 0, u64::MAX, 10),
        Err(HistoryError::Corrupt { offset: 64, .. })
    ));
    assert_eq!(
        read_all(&store, 4),
        model_read(&model, 4, 0, u64::MAX, usize::MAX)
    );
    match store.delete_user(1) {
        Err(HistoryError::DeletionIncomplete { user: 1, paths }) => assert_eq!(paths, vec![segs[0].clone()]),
        other => panic!("expected DeletionIncomplete, got {other:?}"),
    }
    assert_eq!(
        fs::read(&segs[0]).expect("read"),
        bytes,
        "a damaged segment is not rewritten"
    );
    // Deleted from the readable segment.
    model.retain(|r| !(r.user == 1 && r.at_ms >= 10_000));
    assert!(store.read(1, 10_000, u64::MAX, 10).expect("read").is_empty());
    drop(store);

    // A flipped byte in the header: the segment is quarantined at open, kept byte for byte.
    let mut bytes = fs::read(&segs[0]).expect("read");
    bytes[64 + 8] ^= 0x01;
    bytes[30] ^= 0x01;
    fs::write(&segs[0], &bytes).expect("write");
    let mut store = HistoryStore::open(tmp.path(), config).expect("open");
    assert_eq!(store.recovery().corrupt_segments, vec![segs[0].clone()]);
    assert_eq!(store.stats().corrupt_segments, 1);
    assert_eq!(store.stats().sealed_segments, 1);
    // The other segment and the active one still serve reads.
    let later: Vec<Record> = model.iter().filter(|r| r.at_ms >= 10_000).copied().collect();
    for user in 0..5 {
        assert_eq!(
            read_all(&store, user),
            model_read(&later, user, 0, u64::MAX, usize::MAX)
        );
    }
    assert!(matches!(
        store.delete_user(2),
        Err(HistoryError::DeletionIncomplete { .. })
    ));
    assert!(
        read_all(&store, 2).is_empty(),
        "deleted from every readable segment"
    );
    store.append(&[rec(1, 50_000)]).expect("appends go on");
    assert_eq!(fs::read(&segs[0]).expect("read"), bytes);
}

#[test]
fn an_interrupted_seal_and_leftover_temp_files_are_cleaned_up_on_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut store = HistoryStore::open(tmp.path(), torn_config()).expect("open");
    let mut model = Vec::new();
    fill(&mut store, &mut model, 4, 0);
    let active = active_file(tmp.path());
    let active_bytes = fs::read(&active).expect("read");
    store.seal().expect("seal");
    drop(store);
    // As if the seal had stopped after its rename: the sealed file and the old active file.
    fs::write(&active, &active_bytes).expect("restore active");
    fs::write(tmp.path().join("00000000000000000009.seg.tmp"), b"half a segment").expect("tmp");
    fs::write(
        tmp.path().join("00000000000000000002.active.tmp"),
        b"half a rewrite",
    )
    .expect("tmp");

    let mut store = HistoryStore::open(tmp.path(), torn_config()).expect("open");
    assert_eq!(store.recovery().removed_stale_active, 1);
    assert_eq!(store.recovery().removed_temp_files, 2);
    assert!(file_with_ext(tmp.path(), "tmp").is_empty());
    assert!(!active.exists());
    for user in 0..5 {
        assert_eq!(
            read_all(&store, user),
            model_read(&model, user, 0, u64::MAX, usize::MAX)
        );
    }
    fill(&mut store, &mut model, 2, 1_000);
    assert_eq!(store.stats().records, model.len() as u64);
}

#[test]
fn a_torn_segment_header_of_a_new_active_segment_is_rewritten() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut store = HistoryStore::open(tmp.path(), torn_config()).expect("open");
    let mut model = Vec::new();
    fill(&mut store, &mut model, 2, 0);
    store.seal().expect("seal");
    drop(store);
    let active = active_file(tmp.path());
    fs::OpenOptions::new()
        .write(true)
        .open(&active)
        .and_then(|f| f.set_len(20))
        .expect("truncate");
    let mut store = HistoryStore::open(tmp.path(), torn_config()).expect("open");
    assert_eq!(store.recovery().torn_tail_bytes, 20);
    store.append(&[rec(0, 5_000)]).expect("append");
    model.push(rec(0, 5_000));
    assert_eq!(
        read_all(&store, 0),
        model_read(&model, 0, 0, u64::MAX, usize::MAX)
    );
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Op {
    Append(Vec<(u64, u64, f64, f64)>),
    Read {
        user: u64,
        since: u64,
        until: u64,
        limit: usize,
    },
    Seal,
    Reopen,
    DeleteUser(u64),
    DeleteBefore(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    let record = (0..4u64, 0..200u64, -90.0..=90.0f64, -180.0..=180.0f64);
    prop_oneof![
        6 => prop::collection::vec(record, 1..9).prop_map(Op::Append),
        3 => (0..4u64, 0..220u64, 0..220u64, 0..30usize)
            .prop_map(|(user, since, until, limit)| Op::Read { user, since, until, limit }),
        1 => Just(Op::Seal),
        1 => Just(Op::Reopen),
        1 => (0..4u64).prop_map(Op::DeleteUser),
        1 => (0..4u64, 0..220u64).prop_map(|(u, t)| Op::DeleteBefore(u, t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Random appends (out of time order, with equal times), reads, seals, reopens and deletions
    /// give what a plain vector of records gives.
    #[test]
    fn the_store_behaves_like_a_vector_of_records(ops in prop::collection::vec(op(), 1..40)) {
        let tmp = tempfile::tempdir().expect("tempdir");
        // Small enough that every second or third batch seals the active segment.
        let config = StoreConfig { segment_bytes: 600, max_bytes: 1 << 30, ..StoreConfig::default() };
        let mut store = Some(HistoryStore::open(tmp.path(), config.clone()).expect("open"));
        let mut model: Vec<Record> = Vec::new();
        for op in ops {
            let s = store.as_mut().expect("store is open");
            match op {
                Op::Append(records) => {
                    let batch: Vec<Record> = records
                        .into_iter()
                        .map(|(user, at_ms, lat, lon)| Record { user, at_ms, lat, lon })
                        .collect();
                    s.append(&batch).expect("append");
                    model.extend_from_slice(&batch);
                }
                Op::Read { user, since, until, limit } => {
                    prop_assert_eq!(s.read(user, since, until, limit).expect("read"), model_read(&model, user, since, until, limit));
                }
                Op::Seal => s.seal().expect("seal"),
                Op::Reopen => {
                    drop(store.take());
                    store = Some(HistoryStore::open(tmp.path(), config.clone()).expect("reopen"));
                }
                Op::DeleteUser(user) => {
                    let n = model.iter().filter(|r| r.user == user).count();
                    prop_assert_eq!(s.delete_user(user).expect("delete").records_removed, n as u64);
                    model.retain(|r| r.user != user);
                }
                Op::DeleteBefore(user, before) => {
                    let n = model.iter().filter(|r| r.user == user && r.at_ms < before).count();
                    prop_assert_eq!(s.delete_before(user, before).expect("delete_before").records_removed, n as u64);
                    model.retain(|r| !(r.user == user && r.at_ms < before));
                }
            }
            let s = store.as_ref().expect("store is open");
            prop_assert_eq!(s.stats().records, model.len() as u64);
            for user in 0..4 {
                prop_assert_eq!(read_all(s, user), model_read(&model, user, 0, u64::MAX, usize::MAX));
            }
        }
    }
}
