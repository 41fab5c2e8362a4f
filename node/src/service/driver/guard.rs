//! Who may start a handshake: the batched driver's defences against floods of connections.
//!
//! Every byte from outside is hostile until parsed, and a QUIC handshake is the most expensive
//! thing a stranger can make the node do (key exchange, a certificate signature) before any
//! token is checked. Three limits, all decided before that work:
//!
//! - **Address validation under load.** Above [`AbuseLimits::retry_above`] handshakes in progress
//!   (connections not yet past `Hello`), a new connection whose address is not yet validated
//!   gets a QUIC Retry: the client must echo a token bound to its address, so a flood from
//!   spoofed sources costs one stateless packet each, and only reachable addresses count.
//! - **Per address.** At most [`AbuseLimits::handshakes_per_address`] handshakes in progress
//!   and [`AbuseLimits::connections_per_address`] connections in all from one IP address. The
//!   second is generous on purpose: carrier-grade NAT puts many phones behind one address.
//! - **Per user**, once a token is checked: `limits.sessions_per_user` (the session's own limit).
//!
//! The service-wide [`crate::service::ServiceOptions::max_connections`] and the `Hello` timeout
//! (counted from the first packet, before any other work) bound the rest.

use std::collections::HashMap;
use std::net::IpAddr;

/// The limits on connections from outside (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbuseLimits {
    /// Connections from one IP address at once.
    pub connections_per_address: u32,
    /// Connections from one IP address not yet past `Hello`, at once.
    pub handshakes_per_address: u32,
    /// Above this many connections not yet past `Hello` (all addresses), new ones must
    /// validate their address with a QUIC Retry first.
    pub retry_above: u32,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        AbuseLimits {
            connections_per_address: 1024,
            handshakes_per_address: 64,
            retry_above: 256,
        }
    }
}

impl AbuseLimits {
    /// The defaults, but `n` connections and `n` handshakes from one address: for load
    /// generators, whose every simulated user connects from the same address.
    pub fn one_address(n: u32) -> Self {
        AbuseLimits {
            connections_per_address: n,
            handshakes_per_address: n,
            ..Default::default()
        }
    }
}

/// What to do with a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Start the handshake.
    Accept,
    /// Ask the client to prove its address first (stateless).
    Retry,
    /// Refuse it: its address has too many connections, or too many handshakes in progress.
    Refuse(&'static str),
}

/// Connections and handshakes in progress, per address and in all.
#[derive(Debug, Default)]
pub(super) struct Guard {
    limits: AbuseLimits,
    by_address: HashMap<IpAddr, Counts>,
    handshaking: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    open: u32,
    handshaking: u32,
}

impl Guard {
    pub(super) fn new(limits: AbuseLimits) -> Guard {
        Guard {
            limits,
            ..Guard::default()
        }
    }

    /// Judges a new connection from `ip`; `validated` when it already echoed a Retry token,
    /// `may_retry` when a Retry may still be sent (one per connection attempt).
    pub(super) fn judge(&self, ip: IpAddr, validated: bool, may_retry: bool) -> Verdict {
        let c = self.by_address.get(&ip).copied().unwrap_or_default();
        if c.open >= self.limits.connections_per_address {
            return Verdict::Refuse("too many connections from this address");
        }
        if c.handshaking >= self.limits.handshakes_per_address {
            return Verdict::Refuse("too many handshakes from this address");
        }
        if self.handshaking >= self.limits.retry_above && !validated && may_retry {
            return Verdict::Retry;
        }
        Verdict::Accept
    }

    /// A connection from `ip` was accepted: it is handshaking until [`Guard::authenticated`].
    pub(super) fn opened(&mut self, ip: IpAddr) {
        let c = self.by_address.entry(ip).or_default();
        c.open += 1;
        c.handshaking += 1;
        self.handshaking += 1;
    }

    /// The connection from `ip` passed `Hello`.
    pub(super) fn authenticated(&mut self, ip: IpAddr) {
        if let Some(c) = self.by_address.get_mut(&ip) {
            c.handshaking = c.handshaking.saturating_sub(1);
        }
        self.handshaking = self.handshaking.saturating_sub(1);
    }

    /// The connection from `ip` is gone; `authenticated` says whether it had passed `Hello`.
    pub(super) fn closed(&mut self, ip: IpAddr, authenticated: bool) {
        if !authenticated {
            self.authenticated(ip);
        }
        if let Some(c) = self.by_address.get_mut(&ip) {
            c.open = c.open.saturating_sub(1);
            if c.open == 0 {
                self.by_address.remove(&ip);
            }
        }
    }

    /// Connections not yet past `Hello`, all addresses.
    #[cfg(test)]
    fn handshaking(&self) -> u32 {
        self.handshaking
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn an_address_gets_its_handshakes_and_connections_and_no_more() {
        let mut g = Guard::new(AbuseLimits {
            connections_per_address: 3,
            handshakes_per_address: 2,
            retry_above: 100,
        });
        g.opened(ip(1));
        g.opened(ip(1));
        assert_eq!(
            g.judge(ip(1), false, true),
            Verdict::Refuse("too many handshakes from this address")
        );
        assert_eq!(
            g.judge(ip(2), false, true),
            Verdict::Accept,
            "another address is not held back"
        );
        g.authenticated(ip(1));
        assert_eq!(g.judge(ip(1), false, true), Verdict::Accept);
        g.opened(ip(1));
        assert_eq!(
            g.judge(ip(1), false, true),
            Verdict::Refuse("too many connections from this address")
        );
        g.closed(ip(1), true);
        assert_eq!(
            g.judge(ip(1), false, true),
            Verdict::Refuse("too many handshakes from this address")
        );
        g.closed(ip(1), false);
        g.closed(ip(1), false);
        assert_eq!(g.handshaking(), 0);
        assert!(
            g.by_address.is_empty(),
            "nothing kept for an address with no connection"
        );
    }

    #[test]
    fn past_the_threshold_unvalidated_clients_must_retry_once() {
        let mut g = Guard::new(AbuseLimits {
            retry_above: 2,
            ..AbuseLimits::default()
        });
        g.opened(ip(1));
        assert_eq!(g.judge(ip(3), false, true), Verdict::Accept);
        g.opened(ip(2));
        assert_eq!(g.judge(ip(3), false, true), Verdict::Retry);
        assert_eq!(
            g.judge(ip(3), true, false),
            Verdict::Accept,
            "a validated address goes on"
        );
        g.authenticated(ip(1));
        assert_eq!(
            g.judge(ip(3), false, true),
            Verdict::Accept,
            "below the threshold again"
        );
    }
}
