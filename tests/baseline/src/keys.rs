//! The Redis schema of the baseline: key names, channel names, and the text of every value and
//! Pub/Sub message. Pure: no I/O, no clock.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `name:{u}` | string | display name; its existence means "registered" |
//! | `loc:{u}` | string, `EX ttl` | latest location `lat,lon,updated_at` (absent while sharing is off) |
//! | `friends:{u}` | set | mutual friends |
//! | `req_in:{u}` / `req_out:{u}` | set | friend requests received / sent |
//! | `followers:{u}` / `following:{u}` | set | one-way grants: who may see `u` / whom `u` may see |
//! | `hidden:{u}` | set | viewers `u` hides from |
//! | `hiddenby:{v}` | set | users who hide from `v` (the reverse index, read at `v`'s start-up) |
//! | `nosharing:{u}` | string | present while `u` has sharing off |
//!
//! | channel | subscribed by | messages |
//! |---|---|---|
//! | `ch:{u}` | the sessions of everyone who may see `u` | `L,lat,lon,at` (moved) · `G` (sharing off) · `H,v` (hides from `v`) · `S,v[,lat,lon,at]` (unhides `v`) · `X,v` (`v` may no longer see `u`) |
//! | `ctl:{u}` | `u`'s own sessions | `F,f` (subscribe to new friend `f`) · `Q,f` (friend request from `f`) |
//!
//! Numbers are written with Rust's shortest round-trip formatting, so a coordinate read back is
//! the coordinate written.

use std::fmt;

use nearby_index::geo::{LatLng, Millis, UserId};
use nearby_index::ttl::LatestLocation;

/// `name:{u}`.
pub fn name(u: UserId) -> String {
    format!("name:{u}")
}
/// `loc:{u}`.
pub fn loc(u: UserId) -> String {
    format!("loc:{u}")
}
/// `friends:{u}`.
pub fn friends(u: UserId) -> String {
    format!("friends:{u}")
}
/// `req_in:{u}`.
pub fn req_in(u: UserId) -> String {
    format!("req_in:{u}")
}
/// `req_out:{u}`.
pub fn req_out(u: UserId) -> String {
    format!("req_out:{u}")
}
/// `followers:{u}`.
pub fn followers(u: UserId) -> String {
    format!("followers:{u}")
}
/// `following:{u}`.
pub fn following(u: UserId) -> String {
    format!("following:{u}")
}
/// `hidden:{u}`.
pub fn hidden(u: UserId) -> String {
    format!("hidden:{u}")
}
/// `hiddenby:{u}`.
pub fn hidden_by(u: UserId) -> String {
    format!("hiddenby:{u}")
}
/// `nosharing:{u}`.
pub fn no_sharing(u: UserId) -> String {
    format!("nosharing:{u}")
}

/// A Pub/Sub channel of one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `ch:{u}`: `u`'s locations and visibility changes, for those who may see `u`.
    Loc(UserId),
    /// `ctl:{u}`: relation news for `u`'s own sessions.
    Ctl(UserId),
}

impl Channel {
    /// Parses a channel name.
    pub fn parse(name: &[u8]) -> Option<Channel> {
        let s = std::str::from_utf8(name).ok()?;
        if let Some(id) = s.strip_prefix("ch:") {
            return id.parse().ok().map(Channel::Loc);
        }
        s.strip_prefix("ctl:")?.parse().ok().map(Channel::Ctl)
    }

    /// A well-spread hash, to pick the Pub/Sub connection that carries the channel.
    pub fn spread(&self) -> u64 {
        let (id, kind) = match *self {
            Channel::Loc(u) => (u, 0u64),
            Channel::Ctl(u) => (u, 1u64),
        };
        // splitmix64's finaliser: consecutive ids land on different connections.
        let mut z = id
            .wrapping_mul(2)
            .wrapping_add(kind)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::Loc(u) => write!(f, "ch:{u}"),
            Channel::Ctl(u) => write!(f, "ctl:{u}"),
        }
    }
}

/// One Pub/Sub message (see the module doc for the text of each).
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// On `ch:{u}`: `u` is here now.
    Moved(LatestLocation),
    /// On `ch:{u}`: `u` turned sharing off; nobody sees `u` until the next `Moved`.
    SharingOff,
    /// On `ch:{u}`: `u` hides from `viewer`.
    Hide {
        /// Who may no longer see `u`.
        viewer: UserId,
    },
    /// On `ch:{u}`: `u` no longer hides from `viewer`; `u`'s location if it has one.
    Unhide {
        /// Who may see `u` again.
        viewer: UserId,
        /// `u`'s latest location.
        at: Option<LatestLocation>,
    },
    /// On `ch:{u}`: `viewer` may no longer see `u` (unfriended): it unsubscribes.
    Unfriended {
        /// Who lost the relation.
        viewer: UserId,
    },
    /// On `ctl:{u}`: `u` may now see `friend`: subscribe to `ch:{friend}`.
    NewFriend {
        /// The new friend.
        friend: UserId,
    },
    /// On `ctl:{u}`: `from` asked `u` to be friends.
    Request {
        /// Who asked.
        from: UserId,
    },
}

/// `lat,lon,updated_at`: the value of `loc:{u}`.
pub fn encode_location(at: &LatestLocation) -> String {
    format!("{},{},{}", at.loc.lat(), at.loc.lon(), at.updated_at.0)
}

/// Parses `lat,lon,updated_at`.
pub fn decode_location(s: &str) -> Option<LatestLocation> {
    let mut it = s.split(',');
    let loc = parse_loc(&mut it)?;
    it.next().is_none().then_some(loc)
}

fn parse_loc<'a>(it: &mut impl Iterator<Item = &'a str>) -> Option<LatestLocation> {
    let lat: f64 = it.next()?.parse().ok()?;
    let lon: f64 = it.next()?.parse().ok()?;
    let at: u64 = it.next()?.parse().ok()?;
    Some(LatestLocation {
        loc: LatLng::new(lat, lon).ok()?,
        updated_at: Millis(at),
    })
}

impl Message {
    /// The message's text.
    pub fn encode(&self) -> String {
        match self {
            Message::Moved(at) => format!("L,{}", encode_location(at)),
            Message::SharingOff => "G".to_string(),
            Message::Hide { viewer } => format!("H,{viewer}"),
            Message::Unhide { viewer, at: None } => format!("S,{viewer}"),
            Message::Unhide { viewer, at: Some(at) } => format!("S,{viewer},{}", encode_location(at)),
            Message::Unfriended { viewer } => format!("X,{viewer}"),
            Message::NewFriend { friend } => format!("F,{friend}"),
            Message::Request { from } => format!("Q,{from}"),
        }
    }

    /// Parses a message's text; `None` for anything malformed (it is dropped and counted).
    pub fn decode(bytes: &[u8]) -> Option<Message> {
        let s = std::str::from_utf8(bytes).ok()?;
        let mut it = s.split(',');
        let kind = it.next()?;
        let mut id = || it.next().and_then(|x| x.parse::<UserId>().ok());
        let msg = match kind {
            "L" => Message::Moved(parse_loc(&mut it)?),
            "G" => Message::SharingOff,
            "H" => Message::Hide { viewer: id()? },
            "S" => {
                let viewer = id()?;
                let mut rest = it.peekable();
                let at = match rest.peek() {
                    None => None,
                    Some(_) => Some(parse_loc(&mut rest)?),
                };
                return rest.next().is_none().then_some(Message::Unhide { viewer, at });
            }
            "X" => Message::Unfriended { viewer: id()? },
            "F" => Message::NewFriend { friend: id()? },
            "Q" => Message::Request { from: id()? },
            _ => return None,
        };
        it.next().is_none().then_some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64, t: u64) -> LatestLocation {
        LatestLocation {
            loc: LatLng::new(lat, lon).expect("valid"),
            updated_at: Millis(t),
        }
    }

    #[test]
    fn every_message_round_trips_exactly() {
        let l = at(52.520_000_000_000_1, -13.405, 1_764_072_000_123);
        let all = [
            Message::Moved(l),
            Message::SharingOff,
            Message::Hide { viewer: 7 },
            Message::Unhide { viewer: 7, at: None },
            Message::Unhide {
                viewer: 7,
                at: Some(l),
            },
            Message::Unfriended { viewer: 9 },
            Message::NewFriend { friend: 3 },
            Message::Request { from: 4 },
        ];
        for m in all {
            assert_eq!(
                Message::decode(m.encode().as_bytes()),
                Some(m.clone()),
                "{}",
                m.encode()
            );
        }
        assert_eq!(decode_location(&encode_location(&l)), Some(l));
    }

    #[test]
    fn malformed_messages_and_channels_are_refused() {
        for bad in [
            "",
            "L",
            "L,1,2",
            "L,91,0,1",
            "L,1,2,3,4",
            "H,x",
            "S,1,2",
            "Z,1",
            "G,1",
        ] {
            assert_eq!(Message::decode(bad.as_bytes()), None, "{bad}");
        }
        assert_eq!(Channel::parse(b"ch:42"), Some(Channel::Loc(42)));
        assert_eq!(Channel::parse(b"ctl:42"), Some(Channel::Ctl(42)));
        assert_eq!(Channel::parse(b"ch:"), None);
        assert_eq!(Channel::parse(b"loc:1"), None);
        assert_eq!(Channel::Loc(5).to_string(), "ch:5");
    }
}
