//! The friend graph's memory: heap bytes per directed friendship edge held by one group's
//! replicated state, counted by a counting allocator (exact and deterministic, unlike RSS).
//!
//! A group of `USERS` users with `DEGREE` friends each on average, loaded the way `--import`
//! loads a world (`Command::Import` batches applied to the state): half of a user's friends are
//! users of the group, half are drawn from the whole 64-bit id space, as users of other groups
//! are (ranges are cut evenly across it; only the local side of such a friendship is held here).
//! Reports the bytes per directed edge held of the whole state (records, names, sets, the maps
//! holding them) and of the friend sets alone.
//!
//! Run: `cargo bench -p nearby-raft --bench graph_memory` (`NEARBY_BENCH_USERS`,
//! `NEARBY_BENCH_DEGREE` change the world; defaults 20,000 and 190, the comparison world's).

// A bench binary reports on the terminal.
#![allow(clippy::print_stdout)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nearby_index::friends::{FriendSet, UserRange};
use nearby_raft::shard::command::{ImportBatch, MAX_IMPORT_ITEMS};
use nearby_raft::{Command, CommandResult, GroupState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's arguments unchanged;
// the counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by this allocator (so by `System`) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is the caller's, per `realloc`'s contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let users = env("NEARBY_BENCH_USERS", 20_000);
    let degree = env("NEARBY_BENCH_DEGREE", 190);
    let mut rng = StdRng::seed_from_u64(1);
    // The group's own users: a dense run of ids (its range); their friends anywhere.
    let first = 1u64 << 60;
    let range = UserRange::new(first, first + users).expect("range");
    let before = LIVE.load(Ordering::Relaxed);
    let mut state = GroupState::new(range);
    let mut index = 0u64;
    let mut apply = |state: &mut GroupState, batch: ImportBatch| {
        index += 1;
        let result = state.apply(&Command::Import(batch), index);
        assert!(matches!(result, CommandResult::Imported { .. }), "{result:?}");
    };
    let names: Vec<(u64, String)> = (0..users).map(|u| (first + u, format!("user {u}"))).collect();
    for chunk in names.chunks(MAX_IMPORT_ITEMS) {
        let batch = ImportBatch {
            users: chunk.to_vec(),
            ..ImportBatch::default()
        };
        apply(&mut state, batch);
    }
    // Each friendship once, from one side: half of a user's friends in the group itself (a
    // city's users are near each other in id), half spread over the whole id space (users of
    // other groups, of whom only the local side is held).
    let mut batch = ImportBatch::default();
    for u in 0..users {
        let me = first + u;
        for _ in 0..degree / 2 {
            let other = if rng.random_bool(0.5) {
                first + rng.random_range(0..users)
            } else {
                rng.random_range(2..u64::MAX - 1)
            };
            if other != me {
                batch.friendships.push((me, other));
            }
            if batch.friendships.len() == MAX_IMPORT_ITEMS {
                apply(&mut state, std::mem::take(&mut batch));
            }
        }
    }
    apply(&mut state, batch);
    let total = LIVE.load(Ordering::Relaxed) - before;
    let edges: u64 = state.users().map(|(_, r)| r.friends.len()).sum();
    let sets: usize = state
        .users()
        .map(|(_, r)| set_bytes(&r.friends) + set_bytes(&r.rare().followers) + set_bytes(&r.rare().following))
        .sum();
    println!(
        "| {} users | {} directed edges held | whole state {:.1} MiB, {:.1} B/edge | friend sets {:.1} MiB, {:.1} B/edge |",
        state.len(),
        edges,
        total as f64 / 1048576.0,
        total as f64 / edges as f64,
        sets as f64 / 1048576.0,
        sets as f64 / edges as f64,
    );
}

/// Heap bytes of one set, measured by rebuilding it under the counter.
fn set_bytes(set: &FriendSet) -> usize {
    let before = LIVE.load(Ordering::Relaxed);
    let copy: FriendSet = set.iter().collect();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    drop(copy);
    bytes
}
