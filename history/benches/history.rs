//! Benchmarks of the history store on real files (in `$HISTORY_BENCH_DIR`, or the system temp
//! dir): appends with batches of 1, 100 and 1000 records — each batch one write and one
//! `fdatasync`, with sealing included as it comes — and the read of one user's day out of two
//! days of 200 users reporting every minute.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nearby_history::{HistoryStore, Record, StoreConfig};

const DAY: u64 = 86_400_000;
const MINUTE: u64 = 60_000;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("HISTORY_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("bench dir")
}

fn record(user: u64, at_ms: u64) -> Record {
    Record {
        user,
        at_ms,
        lat: 48.85 + (user % 100) as f64 * 1e-3,
        lon: 2.35 + (at_ms % 1000) as f64 * 1e-6,
    }
}

fn appends(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    for n in [1u64, 100, 1000] {
        let dir = bench_dir();
        let mut store = HistoryStore::open(dir.path(), StoreConfig::default()).expect("open");
        let mut at = 0;
        group.throughput(Throughput::Elements(n));
        group.bench_function(BenchmarkId::new("records_per_batch", n), |b| {
            b.iter(|| {
                at += 1_000;
                let batch: Vec<Record> = (0..n).map(|u| record(u, at)).collect();
                store.append(&batch).expect("append");
            })
        });
    }
    group.finish();
}

fn read_day(c: &mut Criterion) {
    let dir = bench_dir();
    let mut store = HistoryStore::open(dir.path(), StoreConfig::default()).expect("open");
    // Two days, 200 users, one location per user per minute, written ten minutes per batch.
    let users = 200;
    for tick in 0..(2 * DAY / MINUTE) / 10 {
        let batch: Vec<Record> = (0..10)
            .flat_map(|m| (0..users).map(move |u| record(u, (tick * 10 + m) * MINUTE + u)))
            .collect();
        store.append(&batch).expect("append");
    }
    let day = store.read(17, DAY, 2 * DAY, usize::MAX).expect("read");
    assert_eq!(day.len(), 1440);
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Elements(day.len() as u64));
    group.bench_function("one_user_one_day", |b| {
        b.iter(|| black_box(store.read(black_box(17), DAY, 2 * DAY, usize::MAX).expect("read")))
    });
    group.finish();
}

criterion_group!(benches, appends, read_day);
criterion_main!(benches);
