//! Criterion benchmarks of the index's hot paths; numbers are recorded in docs/index.md.
//!
//! Run: `cargo bench -p nearby-index -j2 -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use nearby_index::{
    nearby_page, CellIndexer, FriendSet, LatLng, LatestLocation, LocationTable, Millis, NearbyQuery,
    RangeTable, UserRange,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn point(rng: &mut StdRng) -> LatLng {
    let lat = (2.0 * rng.random::<f64>() - 1.0).asin().to_degrees();
    LatLng::new(lat, rng.random_range(-180.0..180.0)).unwrap()
}

/// A point within `max_m` metres of `o` (approximately uniform in a square, good enough here).
fn near(rng: &mut StdRng, o: LatLng, max_m: f64) -> LatLng {
    let dlat = rng.random_range(-1.0..1.0) * max_m / 111_195.0;
    let dlon = rng.random_range(-1.0..1.0) * max_m / (111_195.0 * o.lat().to_radians().cos());
    LatLng::new(o.lat() + dlat, o.lon() + dlon).unwrap()
}

fn distance(c: &mut Criterion) {
    let a = LatLng::new(48.8566, 2.3522).unwrap();
    let b = LatLng::new(48.8738, 2.2950).unwrap();
    c.bench_function("geo/distance_m", |bench| {
        bench.iter(|| black_box(a).distance_m(black_box(&b)))
    });
}

/// Steady state: 1 M users, each refreshed every 100 batches with a TTL of 90 batches, so
/// every batch of 10 k sets also expires ~10 k users.
fn ttl_churn(c: &mut Criterion) {
    const USERS: u64 = 1_000_000;
    const BATCH: u64 = 10_000;
    const STEP_MS: u64 = 300; // time per batch
    let ttl = Duration::from_millis(STEP_MS * 90);
    let mut rng = StdRng::seed_from_u64(1);
    let locs: Vec<LatLng> = (0..1024).map(|_| point(&mut rng)).collect();
    let mut table = LocationTable::new(ttl);
    let mut now = 0u64;
    let mut next_user = 0u64;
    let mut expired = Vec::new();
    let mut batch = |table: &mut LocationTable, now: &mut u64, next_user: &mut u64| {
        for _ in 0..BATCH {
            let u = *next_user % USERS + 1;
            let _ = table.set(u, locs[(u % 1024) as usize], Millis(*now));
            *next_user += 1;
        }
        *now += STEP_MS;
        expired.clear();
        table.expire(Millis(*now), &mut expired);
        expired.len()
    };
    // Warm up to steady state: two full refresh cycles.
    for _ in 0..(2 * USERS / BATCH) {
        batch(&mut table, &mut now, &mut next_user);
    }
    let mut g = c.benchmark_group("ttl");
    g.throughput(Throughput::Elements(BATCH));
    g.sample_size(20);
    g.bench_function("churn_1M_users/batch_10k_sets_plus_expire", |bench| {
        bench.iter(|| batch(&mut table, &mut now, &mut next_user))
    });
    g.finish();
}

fn split(c: &mut Criterion) {
    let width = u64::MAX / 64;
    let table = RangeTable::new(
        (0..64u64)
            .map(|i| (UserRange::new(i * width, (i + 1) * width).unwrap(), i))
            .collect(),
    )
    .unwrap();
    // Dense ids: 200 M users allocated from 1, split into 64 equal ranges.
    const DENSE: u64 = 200_000_000;
    let dense_table = RangeTable::new(
        (0..64u64)
            .map(|i| {
                let w = DENSE / 64;
                (UserRange::new(i * w, (i + 1) * w).unwrap(), i)
            })
            .collect(),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let mut g = c.benchmark_group("friends/split_by_ranges_64");
    for n in [400u64, 5_000] {
        let dense: FriendSet = (0..n).map(|_| rng.random_range(1..DENSE)).collect();
        // Worst case for a treemap: every id in its own 32-bit high half.
        let sparse: FriendSet = (0..n).map(|_| rng.random_range(1..u64::MAX)).collect();
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("{n}_iter_only_dense_ids"), |bench| {
            bench.iter(|| black_box(&dense).iter().fold(0u64, |a, b| a ^ b))
        });
        g.bench_function(format!("{n}_friends_dense_ids"), |bench| {
            bench.iter(|| black_box(&dense).split_by_ranges(&dense_table))
        });
        g.bench_function(format!("{n}_friends_random_u64_ids"), |bench| {
            bench.iter(|| black_box(&sparse).split_by_ranges(&table))
        });
    }
    g.finish();

    // The privacy check on every push: is the viewer in the set? Half the probes are members.
    let mut g = c.benchmark_group("friends/contains");
    for n in [400u64, 5_000] {
        let ids: Vec<u64> = (0..n).map(|_| rng.random_range(1..u64::MAX)).collect();
        let set: FriendSet = ids.iter().copied().collect();
        let probes: Vec<u64> = ids
            .iter()
            .take(64)
            .copied()
            .chain((0..64).map(|_| rng.random_range(1..u64::MAX)))
            .collect();
        g.throughput(Throughput::Elements(probes.len() as u64));
        g.bench_function(format!("{n}_spread_ids_half_members"), |bench| {
            bench.iter(|| probes.iter().filter(|&&p| black_box(&set).contains(p)).count())
        });
    }
    g.finish();
}

fn page(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let viewer = LatLng::new(40.7128, -74.0060).unwrap();
    // 400 friends: ~60 within 8 km, the rest up to 40 km away.
    let cands: Vec<(u64, LatestLocation)> = (1..=400u64)
        .map(|u| {
            let r = if u % 7 == 0 { 8_000.0 } else { 40_000.0 };
            let loc = near(&mut rng, viewer, r);
            (
                u,
                LatestLocation {
                    loc,
                    updated_at: Millis(u),
                },
            )
        })
        .collect();
    let q = NearbyQuery::new(viewer, 8_000.0);
    let first = nearby_page(&q, cands.iter().copied(), None).unwrap();
    let cursor = first.next.clone();
    let mut g = c.benchmark_group("query/nearby_page_400_candidates");
    g.throughput(Throughput::Elements(400));
    g.bench_function("first_page", |bench| {
        bench.iter(|| nearby_page(&q, black_box(cands.iter().copied()), None).unwrap())
    });
    g.bench_function("second_page_via_token", |bench| {
        let token = cursor.as_ref().map(|c| c.to_token()).unwrap_or_default();
        bench.iter(|| {
            let c = nearby_index::Cursor::from_token(black_box(&token)).unwrap();
            nearby_page(&q, cands.iter().copied(), Some(&c)).unwrap()
        })
    });
    g.finish();
}

fn cells(c: &mut Criterion) {
    let ix = CellIndexer::default();
    let mut rng = StdRng::seed_from_u64(4);
    let pts: Vec<LatLng> = (0..4096).map(|_| point(&mut rng)).collect();
    let mut i = 0;
    let mut g = c.benchmark_group("cells_res6");
    g.bench_function("cell_of", |bench| {
        bench.iter(|| {
            i = (i + 1) % pts.len();
            ix.cell_of(black_box(pts[i]))
        })
    });
    g.bench_function("cell_of_plus_cover_8km", |bench| {
        bench.iter_batched(
            || {
                i = (i + 1) % pts.len();
                pts[i]
            },
            |p| ix.cover(ix.cell_of(p), 8_000.0).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, distance, ttl_churn, split, page, cells);
criterion_main!(benches);
