//! The node's counters, and their Prometheus text exposition (format 0.0.4).
//!
//! [`ServiceMetrics`] is counted where things happen — the client service, on every request
//! and push — with relaxed atomics only (no lock on the push path). Everything else an operator
//! reads (groups, leaders, terms, the map's epoch, CPU and memory) is read when `/metrics` is
//! scraped, from the state that already holds it (`crate::admin`). Names follow Prometheus'
//! conventions: `nearby_` prefix, base units (seconds, bytes), `_total` for counters; the list
//! is in `docs/operations.md`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the update → push latency buckets.
pub const LATENCY_BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram with fixed buckets ([`LATENCY_BUCKETS_S`]), lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), and one more for `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS_S.partition_point(|&b| b < s);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0u64;
        for (i, bound) in LATENCY_BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[LATENCY_BUCKETS_S.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Why a location update was refused before it touched anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Closer to the session's previous update than the minimum interval.
    TooSoon,
    /// Shed under overload.
    Shed,
}

/// What the client service counts.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    sessions: AtomicU64,
    sessions_opened: AtomicU64,
    updates: AtomicU64,
    refused_too_soon: AtomicU64,
    shed: AtomicU64,
    pushes: AtomicU64,
    redirects: AtomicU64,
    slow_closed: AtomicU64,
    send_calls: AtomicU64,
    datagrams_sent: AtomicU64,
    retries: AtomicU64,
    refused_by_address: AtomicU64,
    fences: AtomicU64,
    fence_closes: AtomicU64,
    lease_closes: AtomicU64,
    push_latency: Histogram,
}

impl ServiceMetrics {
    /// A session authenticated.
    pub fn session_opened(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.sessions_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// An authenticated session ended.
    pub fn session_closed(&self) {
        // Never below zero, even if a close were counted twice.
        let _ = self
            .sessions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A location update was accepted.
    pub fn update(&self) {
        self.updates.fetch_add(1, Ordering::Relaxed);
    }

    /// A location update was refused.
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::TooSoon => &self.refused_too_soon,
            Refusal::Shed => &self.shed,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// An event was written to a session; `since_update` is the time since the node took the
    /// location it carries, for events that carry one.
    pub fn pushed(&self, since_update: Option<Duration>) {
        self.pushes.fetch_add(1, Ordering::Relaxed);
        if let Some(d) = since_update {
            self.push_latency.observe(d);
        }
    }

    /// A client was sent to another node.
    pub fn redirected(&self) {
        self.redirects.fetch_add(1, Ordering::Relaxed);
    }

    /// A session was closed for reading too slowly.
    pub fn slow_closed(&self) {
        self.slow_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// The batched driver handed `messages` UDP messages to the kernel in one `sendmmsg`.
    pub fn sent(&self, messages: usize) {
        self.send_calls.fetch_add(1, Ordering::Relaxed);
        self.datagrams_sent.fetch_add(messages as u64, Ordering::Relaxed);
    }

    /// A new connection was asked to validate its address (QUIC Retry).
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// A new connection was refused: its address had too many connections or handshakes.
    pub fn refused_by_address(&self) {
        self.refused_by_address.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery fence was passed: the client acknowledged what preceded a revocation.
    pub fn fence_passed(&self) {
        self.fences.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed because its client did not acknowledge what preceded a
    /// revocation in time.
    pub fn fence_closed(&self) {
        self.fence_closes.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was closed because its client had not acknowledged what the group's driver
    /// let out before its lease ended (see [`crate::queue::DeliveryLease`]).
    pub fn lease_closed(&self) {
        self.lease_closes.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed at the end of a delivery lease (see [`Self::lease_closed`]).
    pub fn lease_closes(&self) -> u64 {
        self.lease_closes.load(Ordering::Relaxed)
    }

    /// Delivery fences passed, and connections closed at one (see [`Self::fence_passed`]).
    pub fn fences(&self) -> (u64, u64) {
        (
            self.fences.load(Ordering::Relaxed),
            self.fence_closes.load(Ordering::Relaxed),
        )
    }

    /// Retries sent, and connections refused per address (see [`Self::retried`]).
    pub fn handshake_defences(&self) -> (u64, u64) {
        (
            self.retries.load(Ordering::Relaxed),
            self.refused_by_address.load(Ordering::Relaxed),
        )
    }

    /// `sendmmsg` calls of the batched driver, and the messages they carried.
    pub fn send_calls(&self) -> (u64, u64) {
        (
            self.send_calls.load(Ordering::Relaxed),
            self.datagrams_sent.load(Ordering::Relaxed),
        )
    }

    /// Authenticated sessions open now.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Location updates accepted so far.
    pub fn updates(&self) -> u64 {
        self.updates.load(Ordering::Relaxed)
    }

    /// Events pushed so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// Appends the service's metrics in the text format.
    pub fn render(&self, out: &mut String) {
        gauge(
            out,
            "nearby_sessions",
            "Authenticated client sessions open.",
            self.sessions() as f64,
        );
        counter(
            out,
            "nearby_sessions_opened_total",
            "Client sessions authenticated since start.",
            self.sessions_opened.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_updates_total",
            "Location updates accepted.",
            self.updates(),
        );
        header(
            out,
            "nearby_updates_refused_total",
            "Location updates refused before they touched anything, by reason.",
            "counter",
        );
        let _ = writeln!(
            out,
            "nearby_updates_refused_total{{reason=\"too_soon\"}} {}",
            self.refused_too_soon.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "nearby_updates_refused_total{{reason=\"shed\"}} {}",
            self.shed.load(Ordering::Relaxed)
        );
        counter(
            out,
            "nearby_pushes_total",
            "Events written to sessions.",
            self.pushes(),
        );
        counter(
            out,
            "nearby_redirects_total",
            "Clients sent to another node (wrong node, moved group, drain).",
            self.redirects.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_sessions_closed_slow_total",
            "Sessions closed because the client read too slowly.",
            self.slow_closed.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_client_send_calls_total",
            "sendmmsg calls of the batched client driver.",
            self.send_calls.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_client_send_messages_total",
            "UDP messages those calls carried (a GSO message holds several datagrams).",
            self.datagrams_sent.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_client_retries_total",
            "New connections asked to validate their address first (QUIC Retry, under a handshake flood).",
            self.retries.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_client_refused_by_address_total",
            "New connections refused: their address had too many connections or handshakes.",
            self.refused_by_address.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_delivery_fences_total",
            "Revocations whose viewer's client acknowledged everything written to it before them.",
            self.fences.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_delivery_fence_closes_total",
            "Connections closed because the client did not acknowledge what preceded a revocation in time.",
            self.fence_closes.load(Ordering::Relaxed),
        );
        counter(
            out,
            "nearby_delivery_lease_closes_total",
            "Connections closed because the client had not acknowledged, soon after the group's lease ended, what its leader let out.",
            self.lease_closes.load(Ordering::Relaxed),
        );
        self.push_latency.render(
            out,
            "nearby_update_push_latency_seconds",
            "From the node taking a location to writing the event that carries it to a viewer.",
        );
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes a gauge without labels.
pub fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// Writes a counter without labels.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_cumulative_and_counts_what_it_saw() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "x");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0035\n"), "{out}");
    }

    #[test]
    fn the_session_gauge_never_goes_below_zero() {
        let m = ServiceMetrics::default();
        m.session_opened();
        m.session_closed();
        m.session_closed();
        assert_eq!(m.sessions(), 0);
    }
}
