//! What a [`crate::Client`] is told before it connects: where, whom to trust, who it is, and how
//! it retries ([`Backoff`]). Plain data and pure arithmetic; no I/O.

use std::time::Duration;

use rand::Rng;

use crate::UserId;

/// Everything [`crate::Client::connect`] needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `host:port` of the cluster's nodes, tried in turn until one answers. Any node will do: a
    /// node that does not serve the user redirects it to the one that does.
    pub endpoints: Vec<String>,
    /// The name the node's certificate must carry (`localhost` for a dev node).
    pub server_name: String,
    /// PEM certificates to trust as roots (a dev node writes its self-signed one to
    /// `~/.nearby/ca.pem`). The system's roots are not consulted.
    pub ca_pem: String,
    /// The user the client acts as.
    pub user: UserId,
    /// A token proving it (from the app's login, or [`crate::Client::dev_login`]).
    pub token: String,
    /// How reconnections are spaced.
    pub reconnect: Backoff,
    /// Longest wait for connect + TLS + `Hello` (each hop of a redirect gets its own).
    pub connect_timeout: Duration,
    /// Longest wait for a request's answer. A node that does not answer in time is taken for
    /// gone: the connection is dropped and the client reconnects (elsewhere, if it must) — a
    /// dead node costs a client this long, not the QUIC idle timeout.
    pub request_timeout: Duration,
    /// How often the connection is kept alive by a QUIC ping when nothing else is sent (through
    /// NATs, and so a dead node is noticed without traffic).
    pub keep_alive: Duration,
    /// How long the connection may hear nothing from the node before it is taken for dead and
    /// the client reconnects: what a dead node costs a client that sends nothing. Shorter means
    /// faster failover for quiet clients and more keep-alive packets (battery, on a phone).
    pub idle_timeout: Duration,
    /// Free text naming the client software, sent in `Hello` for the node's logs.
    pub client_name: String,
    /// Events buffered for the app before the client stops reading the node's event stream
    /// (the node then drops superseded locations: a slow app costs bounded memory on both sides).
    pub event_capacity: usize,
    /// Requests in flight at once; further calls wait for a slot.
    pub max_in_flight: usize,
    /// A client endpoint (UDP socket) to share with other clients instead of opening one per
    /// connection — for processes that hold many sessions (load generators, gateways): each
    /// quinn endpoint keeps its own receive buffers of about 2 MB.
    pub shared_endpoint: Option<quinn::Endpoint>,
}

impl ClientConfig {
    /// A configuration for the node at `endpoint` with the defaults: server name `localhost`,
    /// [`Backoff::default`], 10 s connect timeout, 5 s request timeout, keep-alive every 5 s and
    /// a 20 s idle timeout, 256 buffered events, 64 requests in flight.
    pub fn new(
        endpoint: impl Into<String>,
        ca_pem: impl Into<String>,
        user: UserId,
        token: impl Into<String>,
    ) -> Self {
        ClientConfig {
            endpoints: vec![endpoint.into()],
            server_name: DEFAULT_SERVER_NAME.to_string(),
            ca_pem: ca_pem.into(),
            user,
            token: token.into(),
            reconnect: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            keep_alive: crate::tls::DEFAULT_KEEP_ALIVE,
            idle_timeout: crate::tls::DEFAULT_IDLE_TIMEOUT,
            client_name: concat!("nearby-sdk/", env!("CARGO_PKG_VERSION")).to_string(),
            event_capacity: 256,
            max_in_flight: 64,
            shared_endpoint: None,
        }
    }
}

impl ClientConfig {
    /// Tries these nodes, in turn, instead (an empty list keeps the current ones).
    pub fn with_endpoints(mut self, endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let list: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if !list.is_empty() {
            self.endpoints = list;
        }
        self
    }
}

/// The server name used when none is configured: what a dev node's certificate carries.
pub const DEFAULT_SERVER_NAME: &str = "localhost";

/// Jittered exponential backoff between reconnection attempts.
///
/// Attempt `n` (0-based) waits a random time in `[d/2, d]` where `d = min(max, base · 2ⁿ)`:
/// exponential so a dead node is not hammered, jittered so a node's clients do not all come
/// back in the same instant after it restarts.
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first delay.
    pub base: Duration,
    /// No delay is longer than this.
    pub max: Duration,
    /// Attempts after one drop before the client gives up (`None`: never gives up).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    /// 250 ms doubling up to 30 s, never giving up: what a phone app wants.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(250),
            max: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The ceiling of attempt `attempt`'s delay (0-based): `min(max, base · 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before attempt `attempt` (0-based), drawn with `rng`.
    pub fn delay_with<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rng.random_range(0..=spread))
    }

    /// The delay before attempt `attempt` (0-based), drawn from the thread's generator.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut rand::rng())
    }

    /// Whether attempt `attempt` (0-based) may still be made.
    pub fn allows(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn delays_grow_exponentially_within_jitter_bounds_and_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            max_attempts: Some(10),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            let ceiling = b.ceiling(attempt);
            assert!(ceiling <= b.max);
            for _ in 0..50 {
                let d = b.delay_with(attempt, &mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
            }
        }
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_delays() {
        let b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(1);
        let draws: std::collections::HashSet<_> = (0..20).map(|_| b.delay_with(3, &mut rng)).collect();
        assert!(draws.len() > 10);
    }

    #[test]
    fn attempts_are_bounded_when_configured() {
        let b = Backoff {
            max_attempts: Some(2),
            ..Backoff::default()
        };
        assert!(b.allows(0) && b.allows(1) && !b.allows(2));
        assert!(Backoff::default().allows(u32::MAX));
    }
}
