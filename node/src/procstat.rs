//! This process's CPU time, from Linux's `/proc/self/stat` (what load shedding watches; the load
//! simulator reads other processes with the same parser).
//!
//! `/proc` reports CPU time in `USER_HZ` clock ticks, which the kernel fixes at 100 for user
//! space on every architecture Linux supports, so no `sysconf` call is needed.

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

/// This process's CPU seconds so far, or `None` where `/proc` is unavailable.
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(&std::fs::read_to_string("/proc/self/stat").ok()?)
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
    }

    #[test]
    fn reads_this_process() {
        let spin = (0..2_000_000u64).fold(0u64, |a, x| a.wrapping_add(x * x));
        assert!(spin > 0);
        assert!(own_cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
