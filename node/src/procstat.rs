//! CPU time of processes: this process's own at nanosecond resolution (what load shedding
//! watches), and any process's from `/proc/<pid>/stat` (the load simulator's reports).
//!
//! `/proc` reports CPU time in `USER_HZ` clock ticks, which the kernel fixes at 100 for user
//! space on every architecture Linux supports, so no `sysconf` call is needed — but 10 ms ticks
//! are too coarse to judge one core's load over 100 ms, hence the process clock for our own.

use std::time::Duration;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`).
pub const TICKS_PER_S: f64 = 100.0;

/// User + system CPU seconds (`utime + stime`) from the text of `/proc/<pid>/stat`. The command
/// name (field 2) may contain spaces and parentheses, so fields are counted after the *last* `)`.
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_S)
}

/// CPU time this process has used so far, all threads together, from
/// `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)` (`None` if that clock is unavailable).
pub fn process_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec` for the whole call, and the clock id is a
    // constant the platform defines.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

/// Resident memory in bytes from the text of `/proc/<pid>/statm` (its second field, in pages).
pub fn rss_bytes(statm: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size)
}

/// This process's resident memory in bytes (`None` if `/proc` cannot tell).
pub fn own_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    // SAFETY: sysconf only reads a constant of the system.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    rss_bytes(&statm, u64::try_from(page).ok().filter(|p| *p > 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_name_with_spaces_and_parentheses() {
        let stat = "4242 (nearby (x) node) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 9";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("4242 (x) S 1 2"), None);
        assert_eq!(cpu_seconds("no parenthesis"), None);
        assert_eq!(rss_bytes("1000 250 30 1 0 90 0", 4096), Some(1_024_000));
        assert_eq!(rss_bytes("1000", 4096), None);
    }

    #[test]
    fn the_process_clock_advances_with_work() {
        let before = process_cpu_time().expect("the process CPU clock");
        let mut x = 0u64;
        while process_cpu_time().expect("clock") < before + Duration::from_millis(5) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(x > 0);
    }
}
