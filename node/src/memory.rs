//! Giving the allocator's free memory back to the system.
//!
//! glibc's allocator returns memory to the kernel only from the top of each of its heaps; what
//! is freed below a chunk still in use stays resident. A node frees a lot at once only at a few
//! moments — an import (the file, its batches, their log entries), a snapshot built or installed
//! (a whole group's state encoded into one buffer, or decoded from one), a burst of sessions
//! ending — and the friend sets and records allocated meanwhile pin those heaps. Measured on a
//! dev node that imported 20,000 users with 3.7 M friendships: 236 MB of anonymous memory before
//! a trim, 147 MB after (`docs/benchmarks.md`).
//!
//! So a task looks every [`TRIM_EVERY`] at how much the allocator holds free
//! ([`allocator_free_bytes`]) and, above [`TRIM_ABOVE`], hands it back ([`trim`]: `malloc_trim`,
//! which releases the free pages inside the heaps too). Looking costs a walk of the allocator's
//! free lists; trimming, a system call per free range. On a target without glibc both are
//! absent and the task does nothing.

use std::time::{Duration, Instant};

/// How often the trimmer looks.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Free bytes the allocator may hold before the trimmer hands them back.
pub const TRIM_ABOVE: u64 = 16 << 20;

/// The bytes the allocator holds free (kept for reuse), or `None` where it cannot say (not
/// glibc).
pub fn allocator_free_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and only reads the allocator's own state, under
        // its locks.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Hands the allocator's free memory back to the system; returns whether any was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free pages of the allocator's own heaps, under its
        // locks; no memory in use is touched.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Trims if the allocator holds more than `above` bytes free; returns the free bytes it held
/// when it did.
pub fn trim_if_above(above: u64) -> Option<u64> {
    let free = allocator_free_bytes()?;
    if free <= above {
        return None;
    }
    let started = Instant::now();
    let released = trim();
    let after = allocator_free_bytes().unwrap_or(0);
    tracing::debug!(
        free_before = free,
        free_after = after,
        released,
        took = ?started.elapsed(),
        "gave the allocator's free memory back"
    );
    Some(free)
}

/// The trimmer (see the module doc), until aborted.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            // Off the async workers: the walk and the system calls take a few milliseconds on a
            // large heap.
            let _ = tokio::task::spawn_blocking(|| trim_if_above(TRIM_ABOVE)).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_freed_under_a_live_chunk_is_handed_back() {
        let page = 4096;
        // Many chunks below the mmap threshold, so they come from the heap; every other one is
        // freed, so the free pages sit between chunks still in use and no top-of-heap trim can
        // return them.
        let mut chunks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * page]).collect();
        let kept: Vec<Vec<u8>> = chunks.iter_mut().skip(1).step_by(2).map(std::mem::take).collect();
        drop(chunks);
        let free = allocator_free_bytes().expect("glibc says");
        assert!(free >= 2048 * 16 * page as u64, "free {free}");
        let rss = || crate::procstat::own_rss_bytes().expect("rss");
        let before = rss();
        let trimmed = trim_if_above(0).expect("trimmed");
        assert!(
            trimmed >= 2048 * 16 * page as u64,
            "held {trimmed} free when it trimmed"
        );
        let after = rss();
        // Half of the 256 MiB was freed; most of it must leave the process.
        assert!(
            before.saturating_sub(after) >= 100 << 20,
            "resident {before} -> {after} bytes"
        );
        assert!(trim_if_above(u64::MAX).is_none(), "below the bound: left alone");
        drop(kept);
    }
}
