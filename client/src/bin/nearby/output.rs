//! What `nearby` prints: the JSON documents (`--json`) and the human lines, as pure functions of
//! the SDK's values and the current time. Never prints: `main.rs` does.
//!
//! JSON shapes (times are RFC 3339 UTC with milliseconds, distances in metres):
//!
//! - friend: `{"id":2,"name":"Bea","relation":"friend","distance_m":420.5,"updated_at":"2023-11-14T22:13:20.000Z"}`
//!   (`"relation":"following"` for a user you follow)
//! - `list`: `{"friends":[friend…],"next":"cursor"|null,"page":1}`
//! - `location set`: `{"ok":true,"friends":[friend…],"next":…,"next_update_s":30}`
//! - changes: `{"ok":true,"outcome":"friend_request_sent"}`
//! - `friends list`: `{"sharing":true,"discoverable":false,"ghost_until":null,"friends":[{"id":2,"name":"Bea"|null,"relation":"friend","hidden":false}]}`
//!   (relations: `friend`, `request_received`, `request_sent`, `follower`, `following`;
//!   `ghost_until`: a time, `"forever"` until turned off, or `null`)
//! - `followers list`: `{"followers":[{"id":4,"name":"Dee"|null,"hidden":false}]}`; `follow list`:
//!   `{"following":[…]}` likewise
//! - `strangers`: `{"strangers":[{"pseudonym":"…","name":"…","distance_m":1500,"updated_at":"…"}],"more":N}`
//! - `history`: `{"points":[{"lat":52.52,"lon":13.405,"at":"…"}],"more":false,"complete":true}`
//! - `ghost`: `{"ok":true,"ghost":"on","until":"…"|"forever"}` or `{"ok":true,"ghost":"off","until":null}`
//! - `watch`: one object per line with `"event"`; see [`event_json`] and [`sdk_event_json`].
//! - errors: `{"error":{"code":"unknown_user","message":"…"}}`

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nearby_client::proto::{
    Event, FriendList, GoneReason, HistoryPage, NearbyFriend, NearbyPage, Outcome, Relation, Stranger,
    StrangerPage, GHOST_FOREVER,
};
use nearby_client::{ClientError, Millis, SdkEvent, UserId};
use serde_json::{json, Value};

/// The last millisecond RFC 3339 (four-digit years) can write.
const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// `at` as RFC 3339 UTC with milliseconds; times past year 9999 are clamped (a node's clock
/// must not be able to crash the CLI).
pub(crate) fn rfc3339(at: Millis) -> String {
    let ms = at.as_u64().min(MAX_RFC3339_MS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A friend in range.
pub(crate) fn friend_json(f: &NearbyFriend) -> Value {
    json!({
        "id": f.id,
        "name": f.name,
        "relation": relation_name(f.relation),
        "distance_m": f.distance_m,
        "updated_at": rfc3339(f.updated_at),
    })
}

/// `{"friends":[…],"next":…}`.
pub(crate) fn page_json(page: &NearbyPage) -> Value {
    json!({
        "friends": page.friends.iter().map(friend_json).collect::<Vec<_>>(),
        "next": page.next,
    })
}

/// `nearby list`.
pub(crate) fn list_json(page: &NearbyPage, number: u32) -> Value {
    let mut v = page_json(page);
    v["page"] = json!(number);
    v
}

/// `nearby location set`.
pub(crate) fn located_json(page: &NearbyPage, next_update_s: u32) -> Value {
    let mut v = page_json(page);
    v["ok"] = json!(true);
    v["next_update_s"] = json!(next_update_s);
    v
}

/// A committed change.
pub(crate) fn outcome_json(outcome: Outcome) -> Value {
    json!({"ok": true, "outcome": outcome_name(outcome)})
}

/// The outcome's snake_case name.
pub(crate) fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Updated => "updated",
        Outcome::Unchanged => "unchanged",
        Outcome::FriendRequestSent => "friend_request_sent",
        Outcome::FriendshipFormed => "friendship_formed",
        Outcome::AlreadyFriends => "already_friends",
        Outcome::FriendRemoved => "friend_removed",
    }
}

fn relation_name(relation: Relation) -> &'static str {
    match relation {
        Relation::Friend => "friend",
        Relation::RequestReceived => "request_received",
        Relation::RequestSent => "request_sent",
        Relation::Follower => "follower",
        Relation::Following => "following",
    }
}

/// A stranger: never an id, a distance rounded to 500 m.
fn stranger_json(s: &Stranger) -> Value {
    json!({
        "pseudonym": s.pseudonym,
        "name": s.name,
        "distance_m": s.distance_m,
        "updated_at": rfc3339(s.updated_at),
    })
}

/// `nearby strangers`.
pub(crate) fn strangers_json(page: &StrangerPage) -> Value {
    json!({
        "strangers": page.strangers.iter().map(stranger_json).collect::<Vec<_>>(),
        "more": page.more,
    })
}

/// `nearby strangers` for people.
pub(crate) fn strangers_text(page: &StrangerPage, now: SystemTime) -> String {
    if page.strangers.is_empty() {
        return "no discoverable stranger in range".into();
    }
    let mut out: Vec<String> = page
        .strangers
        .iter()
        .map(|s| {
            format!(
                "{:>10}  {}  [{}]  (updated {})",
                format!("≤ {}", distance(f64::from(s.distance_m))),
                s.name,
                s.pseudonym,
                ago(s.updated_at, now)
            )
        })
        .collect();
    if page.more > 0 {
        out.push(format!("… and {} more in range", page.more));
    }
    out.join("\n")
}

/// `nearby history`.
pub(crate) fn history_json(page: &HistoryPage) -> Value {
    json!({
        "points": page.points.iter().map(|p| json!({
            "lat": p.at.lat,
            "lon": p.at.lon,
            "at": rfc3339(p.recorded_at),
        })).collect::<Vec<_>>(),
        "more": page.more,
        "complete": page.complete,
    })
}

/// `nearby history` for people.
pub(crate) fn history_text(page: &HistoryPage) -> String {
    let mut out: Vec<String> = page
        .points
        .iter()
        .map(|p| format!("{}  {:.6}, {:.6}", rfc3339(p.recorded_at), p.at.lat, p.at.lon))
        .collect();
    if out.is_empty() {
        out.push("no location recorded in that time".into());
    }
    if page.more {
        out.push("(more: ask again with --since after the last time)".into());
    }
    if !page.complete {
        out.push("(incomplete: a node holding part of your history did not answer)".into());
    }
    out.join("\n")
}

/// A ghost mode's end as JSON: a time, `"forever"`, or `null`.
fn ghost_until_json(until: Option<Millis>) -> Value {
    match until {
        None => Value::Null,
        Some(GHOST_FOREVER) => json!("forever"),
        Some(t) => json!(rfc3339(t)),
    }
}

/// `nearby ghost`.
pub(crate) fn ghost_json(until: Option<Millis>) -> Value {
    json!({
        "ok": true,
        "ghost": if until.is_some() { "on" } else { "off" },
        "until": ghost_until_json(until),
    })
}

/// `nearby ghost` for people.
pub(crate) fn ghost_text(until: Option<Millis>) -> String {
    match until {
        None => "ghost mode off: your friends and followers see you again".into(),
        Some(GHOST_FOREVER) => "ghost mode on until `nearby ghost off`: nobody sees you".into(),
        Some(t) => format!("ghost mode on until {}: nobody sees you", rfc3339(t)),
    }
}

/// `nearby followers list` / `nearby follow list`: the entries of one relation, under `key`.
pub(crate) fn relation_list_json(list: &FriendList, relation: Relation, key: &str) -> Value {
    let entries: Vec<Value> = list
        .entries
        .iter()
        .filter(|e| e.relation == relation)
        .map(|e| json!({"id": e.id, "name": e.name, "hidden": e.hidden}))
        .collect();
    json!({ key: entries })
}

/// The entries of one relation for people; `empty` when there are none.
pub(crate) fn relation_list_text(list: &FriendList, relation: Relation, empty: &str) -> String {
    let lines: Vec<String> = list
        .entries
        .iter()
        .filter(|e| e.relation == relation)
        .map(|e| {
            let hidden = if e.hidden { "  (hidden from them)" } else { "" };
            format!("#{:<8} {}{hidden}", e.id, e.name.as_deref().unwrap_or("?"))
        })
        .collect();
    if lines.is_empty() {
        empty.to_string()
    } else {
        lines.join("\n")
    }
}

fn reason_name(reason: GoneReason) -> &'static str {
    match reason {
        GoneReason::Inactive => "inactive",
        GoneReason::Unfriended => "unfriended",
        GoneReason::Hidden => "hidden",
    }
}

/// `nearby friends list`.
pub(crate) fn friend_list_json(list: &FriendList) -> Value {
    json!({
        "sharing": list.sharing,
        "discoverable": list.discoverable,
        "ghost_until": ghost_until_json(list.ghost_until),
        "history": list.history,
        "friends": list.entries.iter().map(|e| json!({
            "id": e.id,
            "name": e.name,
            "relation": relation_name(e.relation),
            "hidden": e.hidden,
        })).collect::<Vec<_>>(),
    })
}

/// An error: `{"error":{"code":…,"message":…}}`.
pub(crate) fn error_json(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message}})
}

/// What an error's `"code"` and message are, and the stderr line.
pub(crate) fn client_error_parts(e: &ClientError) -> (&'static str, String) {
    match e {
        ClientError::Server(body) => (body.code.name(), body.message.clone()),
        other => (other.kind_name(), other.to_string()),
    }
}

/// One pushed event as a JSON object.
pub(crate) fn event_json(event: &Event) -> Value {
    match event {
        Event::FriendMoved(p) | Event::FriendEntered(p) => json!({
            "event": if matches!(event, Event::FriendMoved(_)) { "moved" } else { "entered" },
            "id": p.id,
            "lat": p.at.lat,
            "lon": p.at.lon,
            "distance_m": p.distance_m,
            "updated_at": rfc3339(p.updated_at),
        }),
        Event::FriendLeft {
            id,
            distance_m,
            updated_at,
        } => json!({
            "event": "left",
            "id": id,
            "distance_m": distance_m,
            "updated_at": rfc3339(*updated_at),
        }),
        Event::FriendGone { id, reason } => json!({
            "event": "gone",
            "id": id,
            "reason": reason_name(*reason),
        }),
        Event::FriendRequest { from } => json!({"event": "friend_request", "id": from}),
        Event::Cadence { next_update_s } => json!({"event": "cadence", "next_update_s": next_update_s}),
        Event::Shutdown {
            reconnect_after_ms,
            redirect,
        } => json!({
            "event": "shutdown",
            "reconnect_after_ms": reconnect_after_ms,
            "redirect": redirect,
        }),
        Event::StrangerNearby(s) => {
            let mut v = stranger_json(s);
            v["event"] = json!("stranger");
            v
        }
        Event::StrangerGone { pseudonym } => json!({"event": "stranger_gone", "pseudonym": pseudonym}),
        Event::TokenExpiring { expires_at } => {
            json!({"event": "token_expiring", "expires_at": rfc3339(*expires_at)})
        }
    }
}

/// One SDK event as a JSON object: node events as [`event_json`], plus `reconnecting`,
/// `resumed` (with the fresh page, `"friends": null` if none) and `closed`.
pub(crate) fn sdk_event_json(event: &SdkEvent) -> Value {
    match event {
        SdkEvent::Event(e) => event_json(e),
        SdkEvent::Reconnecting {
            attempt,
            after,
            reason,
            planned,
        } => {
            let (code, message) = client_error_parts(reason);
            json!({
                "event": "reconnecting",
                "attempt": attempt,
                "after_ms": u64::try_from(after.as_millis()).unwrap_or(u64::MAX),
                "reason": {"code": code, "message": message},
                "planned": planned,
            })
        }
        SdkEvent::Resumed { page } => {
            let mut v = match page {
                Some(page) => page_json(page),
                None => json!({"friends": null, "next": null}),
            };
            v["event"] = json!("resumed");
            v
        }
        SdkEvent::Closed(reason) => {
            let (code, message) = client_error_parts(reason);
            json!({"event": "closed", "error": {"code": code, "message": message}})
        }
        _ => json!({"event": "unknown"}),
    }
}

/// The first page shown by `watch` when it sends a location.
pub(crate) fn watch_page_json(page: &NearbyPage) -> Value {
    let mut v = page_json(page);
    v["event"] = json!("page");
    v
}

/// `420 m`, `1.3 km`.
pub(crate) fn distance(meters: f64) -> String {
    if meters < 1000.0 {
        format!("{meters:.0} m")
    } else {
        format!("{:.1} km", meters / 1000.0)
    }
}

/// `12 s ago`, `5 min ago`, `2 h ago` (and `just now` for times at or after `now`).
pub(crate) fn ago(at: Millis, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let secs = now_ms.saturating_sub(at.as_u64()) / 1000;
    match secs {
        0 => "just now".to_string(),
        1..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

/// A friend's name for people: `Bea (#2)`, or `#2` when unknown.
fn who(id: UserId, names: &HashMap<UserId, String>) -> String {
    match names.get(&id) {
        Some(name) => format!("{name} (#{id})"),
        None => format!("#{id}"),
    }
}

/// A page for people, one friend a line; `empty` when nobody is in range.
pub(crate) fn page_text(page: &NearbyPage, now: SystemTime, empty: &str) -> String {
    if page.friends.is_empty() {
        return empty.to_string();
    }
    let mut out = String::new();
    for f in &page.friends {
        out.push_str(&format!(
            "{:>10}  {}  (updated {}, {})\n",
            distance(f.distance_m),
            who(f.id, &HashMap::from([(f.id, f.name.clone())])),
            ago(f.updated_at, now),
            rfc3339(f.updated_at),
        ));
    }
    if page.next.is_some() {
        out.push_str("(more: --page N for the next pages)\n");
    }
    out.trim_end().to_string()
}

/// A change's outcome for people; `other` is the user the change was about, if any.
pub(crate) fn outcome_text(outcome: Outcome, other: Option<UserId>) -> String {
    let them = other.map(|id| format!("#{id}")).unwrap_or_default();
    match outcome {
        Outcome::Updated => "done".to_string(),
        Outcome::Unchanged => "nothing to change: it already was so".to_string(),
        Outcome::FriendRequestSent => format!("friend request sent to {them}"),
        Outcome::FriendshipFormed => format!("you and {them} are now friends"),
        Outcome::AlreadyFriends => format!("already friends with {them}"),
        Outcome::FriendRemoved => format!("{them} removed"),
    }
}

/// The friend list for people.
pub(crate) fn friend_list_text(list: &FriendList) -> String {
    let on_off = |b: bool| if b { "on" } else { "off" };
    let mut out = format!(
        "sharing: {}, discoverable by strangers: {}\n",
        on_off(list.sharing),
        on_off(list.discoverable)
    );
    match list.ghost_until {
        Some(GHOST_FOREVER) => out.push_str("ghost mode: on until turned off\n"),
        Some(t) => out.push_str(&format!("ghost mode: on until {}\n", rfc3339(t))),
        None => {}
    }
    if list.entries.is_empty() {
        out.push_str("no friends yet: `nearby friends add ID`");
    }
    for e in &list.entries {
        let name = e.name.as_deref().unwrap_or("?");
        let relation = match e.relation {
            Relation::Friend => "friend",
            Relation::RequestReceived => "asked you (accept: `nearby friends add ID`)",
            Relation::RequestSent => "request sent",
            Relation::Follower => "follows you",
            Relation::Following => "you follow them",
        };
        let hidden = if e.hidden { ", hidden from them" } else { "" };
        out.push_str(&format!("#{:<8} {name}  {relation}{hidden}\n", e.id));
    }
    out.trim_end().to_string()
}

/// One SDK event for people; `names` are the friends' names seen so far.
pub(crate) fn sdk_event_text(event: &SdkEvent, names: &HashMap<UserId, String>, now: SystemTime) -> String {
    match event {
        SdkEvent::Event(e) => match e {
            Event::FriendMoved(p) => format!(
                "moved     {}  {} away  ({})",
                who(p.id, names),
                distance(p.distance_m),
                rfc3339(p.updated_at)
            ),
            Event::FriendEntered(p) => format!(
                "entered   {}  {} away  ({})",
                who(p.id, names),
                distance(p.distance_m),
                rfc3339(p.updated_at)
            ),
            Event::FriendLeft { id, distance_m, .. } => format!(
                "left      {}  beyond {} (out of range)",
                who(*id, names),
                distance(*distance_m)
            ),
            Event::FriendGone { id, reason } => {
                format!("gone      {}  ({})", who(*id, names), reason_name(*reason))
            }
            Event::FriendRequest { from } => format!(
                "request   {} asks to be friends (accept: `nearby friends add {from}`)",
                who(*from, names)
            ),
            Event::Cadence { next_update_s } => {
                format!("cadence   the node wants an update every {next_update_s} s")
            }
            Event::Shutdown {
                reconnect_after_ms,
                redirect,
            } => format!(
                "shutdown  the node is going away; moving to {} in {reconnect_after_ms} ms",
                redirect.as_deref().unwrap_or("the same endpoint")
            ),
            Event::StrangerNearby(s) => format!(
                "stranger  {} [{}]  within {}",
                s.name,
                s.pseudonym,
                distance(f64::from(s.distance_m))
            ),
            Event::StrangerGone { pseudonym } => format!("stranger  [{pseudonym}] gone"),
            Event::TokenExpiring { expires_at } => format!(
                "token     expires at {}: run `nearby login` for a fresh one",
                rfc3339(*expires_at)
            ),
        },
        SdkEvent::Reconnecting {
            attempt,
            after,
            reason,
            planned,
        } => format!(
            "{} (attempt {attempt}, in {} ms): {reason}",
            if *planned {
                "moved by the node; reconnecting"
            } else {
                "reconnecting"
            },
            after.as_millis()
        ),
        SdkEvent::Resumed { page } => match page {
            Some(page) => format!(
                "resumed; friends in range:\n{}",
                page_text(page, now, "  nobody in range")
            ),
            None => "resumed".to_string(),
        },
        SdkEvent::Closed(reason) => format!("closed: {reason}"),
        _ => "(unknown event)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearby_client::proto::{Coord, ErrorBody, ErrorCode, FriendEntry, FriendPosition};

    const T: Millis = Millis(1_700_000_000_123);
    const T_TEXT: &str = "2023-11-14T22:13:20.123Z";

    fn page() -> NearbyPage {
        NearbyPage {
            friends: vec![NearbyFriend {
                id: 2,
                relation: Relation::Friend,
                name: "Bea".into(),
                distance_m: 420.5,
                updated_at: T,
            }],
            next: Some("c2".into()),
        }
    }

    #[test]
    fn list_shape() {
        assert_eq!(
            list_json(&page(), 1),
            json!({
                "friends": [{"id": 2, "name": "Bea", "relation": "friend", "distance_m": 420.5, "updated_at": T_TEXT}],
                "next": "c2",
                "page": 1,
            })
        );
        let last = NearbyPage {
            friends: vec![],
            next: None,
        };
        assert_eq!(
            list_json(&last, 3),
            json!({"friends": [], "next": null, "page": 3})
        );
    }

    #[test]
    fn location_and_change_shapes() {
        assert_eq!(
            located_json(&page(), 30),
            json!({
                "ok": true,
                "friends": [{"id": 2, "name": "Bea", "relation": "friend", "distance_m": 420.5, "updated_at": T_TEXT}],
                "next": "c2",
                "next_update_s": 30,
            })
        );
        assert_eq!(
            outcome_json(Outcome::FriendshipFormed),
            json!({"ok": true, "outcome": "friendship_formed"})
        );
        let list = FriendList {
            entries: vec![FriendEntry {
                id: 3,
                name: None,
                relation: Relation::RequestReceived,
                hidden: true,
            }],
            sharing: false,
            discoverable: true,
            ghost_until: Some(T),
            history: true,
            next: None,
        };
        assert_eq!(
            friend_list_json(&list),
            json!({"sharing": false, "discoverable": true, "ghost_until": T_TEXT, "history": true, "friends": [
                {"id": 3, "name": null, "relation": "request_received", "hidden": true}
            ]})
        );
    }

    #[test]
    fn event_shapes() {
        let p = FriendPosition {
            id: 2,
            at: Coord { lat: 1.5, lon: -2.0 },
            distance_m: 10.0,
            updated_at: T,
        };
        let cases = [
            (
                Event::FriendMoved(p.clone()),
                json!({"event": "moved", "id": 2, "lat": 1.5, "lon": -2.0, "distance_m": 10.0, "updated_at": T_TEXT}),
            ),
            (
                Event::FriendEntered(p),
                json!({"event": "entered", "id": 2, "lat": 1.5, "lon": -2.0, "distance_m": 10.0, "updated_at": T_TEXT}),
            ),
            (
                Event::FriendLeft {
                    id: 2,
                    distance_m: 9000.0,
                    updated_at: T,
                },
                json!({"event": "left", "id": 2, "distance_m": 9000.0, "updated_at": T_TEXT}),
            ),
            (
                Event::FriendGone {
                    id: 2,
                    reason: GoneReason::Hidden,
                },
                json!({"event": "gone", "id": 2, "reason": "hidden"}),
            ),
            (
                Event::FriendRequest { from: 4 },
                json!({"event": "friend_request", "id": 4}),
            ),
            (
                Event::Cadence { next_update_s: 60 },
                json!({"event": "cadence", "next_update_s": 60}),
            ),
            (
                Event::Shutdown {
                    reconnect_after_ms: 500,
                    redirect: Some("h:1".into()),
                },
                json!({"event": "shutdown", "reconnect_after_ms": 500, "redirect": "h:1"}),
            ),
        ];
        for (event, want) in cases {
            assert_eq!(event_json(&event), want);
            // One line each in `watch --json`.
            assert!(!serde_json::to_string(&event_json(&event))
                .expect("json")
                .contains('\n'));
        }
    }

    #[test]
    fn sdk_event_shapes() {
        let reason = ClientError::ConnectionLost {
            reason: "gone".into(),
        };
        assert_eq!(
            sdk_event_json(&SdkEvent::Reconnecting {
                attempt: 2,
                after: Duration::from_millis(250),
                reason,
                planned: false,
            }),
            json!({"event": "reconnecting", "attempt": 2, "after_ms": 250,
                   "reason": {"code": "connection_lost", "message": "connection lost while the request was in flight: gone"},
                   "planned": false})
        );
        assert_eq!(
            sdk_event_json(&SdkEvent::Resumed { page: None }),
            json!({"event": "resumed", "friends": null, "next": null})
        );
        assert_eq!(
            sdk_event_json(&SdkEvent::Resumed { page: Some(page()) })["friends"][0]["id"],
            2
        );
        let closed = SdkEvent::Closed(ClientError::Server(ErrorBody {
            code: ErrorCode::TokenExpired,
            message: "expired".into(),
        }));
        assert_eq!(
            sdk_event_json(&closed),
            json!({"event": "closed", "error": {"code": "token_expired", "message": "expired"}})
        );
    }

    #[test]
    fn error_shape() {
        assert_eq!(
            error_json("unknown_user", "no such user"),
            json!({"error": {"code": "unknown_user", "message": "no such user"}})
        );
    }

    #[test]
    fn times_never_panic() {
        assert_eq!(rfc3339(Millis(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(Millis(u64::MAX)), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn human_text() {
        assert_eq!(distance(420.4), "420 m");
        assert_eq!(distance(1250.0), "1.2 km");
        let now = UNIX_EPOCH + Duration::from_millis(T.as_u64() + 12_000);
        assert_eq!(ago(T, now), "12 s ago");
        assert_eq!(ago(Millis(T.as_u64() + 99_000), now), "just now");
        let text = page_text(&page(), now, "nobody");
        assert!(
            text.contains("Bea (#2)") && text.contains("420 m") && text.contains("12 s ago"),
            "{text}"
        );
        assert_eq!(
            page_text(
                &NearbyPage {
                    friends: vec![],
                    next: None
                },
                now,
                "nobody"
            ),
            "nobody"
        );
        let names = HashMap::from([(2, "Bea".to_string())]);
        let line = sdk_event_text(
            &SdkEvent::Event(Event::FriendGone {
                id: 2,
                reason: GoneReason::Inactive,
            }),
            &names,
            now,
        );
        assert_eq!(line, "gone      Bea (#2)  (inactive)");
    }
}
