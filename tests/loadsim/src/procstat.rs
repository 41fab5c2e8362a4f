//! CPU time and memory of a process, from Linux's `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! Parsing is pure ([`parse_stat`], [`parse_status`]); only [`sample`] reads files. CPU time is
//! `utime + stime` (the process's own threads, not its children) in clock ticks; `/proc` reports
//! them in `USER_HZ`, which the kernel fixes at 100 for user space on every architecture Linux
//! supports, so no `sysconf` call is needed.

use std::path::PathBuf;

use serde::Serialize;

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds used so far.
    pub cpu_s: f64,
    /// Resident set size now, KiB (`VmRSS`).
    pub rss_kb: u64,
    /// Peak resident set size so far, KiB (`VmHWM`).
    pub peak_rss_kb: u64,
}

impl ProcSample {
    /// Two processes read as one system: CPU and RSS added; the peak is the sum of the peaks
    /// (an upper bound: the two need not have peaked at the same moment).
    pub fn plus(self, other: ProcSample) -> ProcSample {
        ProcSample {
            cpu_s: self.cpu_s + other.cpu_s,
            rss_kb: self.rss_kb + other.rss_kb,
            peak_rss_kb: self.peak_rss_kb + other.peak_rss_kb,
        }
    }
}

/// Why a process could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcError {
    /// The file could not be read (no such process, or not Linux).
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not as expected.
    #[error("{path}: unexpected format: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Reads process `pid` now.
pub fn sample(pid: u32) -> Result<ProcSample, ProcError> {
    let read = |name: &str| {
        let path = PathBuf::from(format!("/proc/{pid}/{name}"));
        std::fs::read_to_string(&path)
            .map(|text| (text, path.clone()))
            .map_err(|source| ProcError::Read { path, source })
    };
    let (stat, stat_path) = read("stat")?;
    let (status, status_path) = read("status")?;
    let cpu_s = parse_stat(&stat).ok_or(ProcError::Format {
        path: stat_path,
        reason: "no utime/stime fields",
    })?;
    let (rss_kb, peak_rss_kb) = parse_status(&status).ok_or(ProcError::Format {
        path: status_path,
        reason: "no VmRSS/VmHWM lines",
    })?;
    Ok(ProcSample {
        cpu_s,
        rss_kb,
        peak_rss_kb,
    })
}

/// CPU seconds (`utime + stime`) from the text of `/proc/<pid>/stat` (nearby's own parser).
pub fn parse_stat(text: &str) -> Option<f64> {
    nearby_node::procstat::cpu_seconds(text)
}

/// `(VmRSS, VmHWM)` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    // `parse_stat` is nearby-node's parser, tested there.
    #[test]
    fn parses_rss_and_its_peak() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status(status), Some((1024, 2048)));
        assert_eq!(parse_status("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id()).expect("own /proc entry");
        assert!(s.peak_rss_kb >= s.rss_kb && s.rss_kb > 0);
    }
}
