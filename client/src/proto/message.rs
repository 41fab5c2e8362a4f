//! Every message of the protocol. Field order is the wire order (bincode); adding a variant at
//! the end of an enum is compatible, anything else needs a new [`super::PROTOCOL_VERSION`].

use std::fmt;

use nearby_index::geo::{Millis, UserId};
use serde::{Deserialize, Serialize};

/// Identifies a request on the control stream; the response carries the same id. Chosen by the
/// client (a counter is fine).
pub type RequestId = u64;

/// A point as sent on the wire: plain numbers, validated by the receiver (NaN, infinities,
/// |lat| > 90 and |lon| > 180 are refused with [`ErrorCode::InvalidCoordinates`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    /// Latitude in degrees.
    pub lat: f64,
    /// Longitude in degrees.
    pub lon: f64,
}

/// One request on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Echoed in the response.
    pub id: RequestId,
    /// What is asked.
    pub request: Request,
}

/// One response on the control stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The id of the request answered.
    pub id: RequestId,
    /// The answer.
    pub response: Response,
}

/// What a client asks. Every request acts as the user the session authenticated as; no request
/// can name another acting user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// MUST be the first request: protocol version, the user the client acts as, and a token
    /// proving it.
    Hello {
        /// The client's [`super::PROTOCOL_VERSION`].
        version: u16,
        /// The user the client claims to be; must match the token's subject.
        user: UserId,
        /// The signed token (see `docs/protocol.md`).
        token: String,
        /// Free text naming the client software, for logs.
        client: String,
    },
    /// The user's current location. The first one of a session starts it: the node answers
    /// with the first page of friends in range and starts pushing events.
    UpdateLocation {
        /// Where the user is.
        at: Coord,
    },
    /// A page of friends in range, nearest first.
    ListNearby {
        /// `None` for the first page, else the `next` of the previous page.
        cursor: Option<String>,
        /// Entries per page; the node's default (20) if `None`.
        page_size: Option<u16>,
    },
    /// A page of the user's relations (friends, pending requests, followers, followed users)
    /// and settings, ascending by the other user's id.
    ListFriends {
        /// `None` for the first page, else the `next` of the previous page.
        after: Option<UserId>,
        /// Users per page ([`MAX_FRIENDS_PAGE`] if `None` or larger).
        limit: Option<u16>,
    },
    /// Ask `user` to be friends, or accept their request.
    AddFriend {
        /// The other user.
        user: UserId,
    },
    /// End a friendship, or cancel / decline a request.
    RemoveFriend {
        /// The other user.
        user: UserId,
    },
    /// Turn location sharing on or off.
    SetSharing {
        /// On or off.
        on: bool,
    },
    /// Hide from one friend.
    Hide {
        /// The friend.
        user: UserId,
    },
    /// Stop hiding from one friend.
    Unhide {
        /// The friend.
        user: UserId,
    },
    /// Change the display name.
    SetName {
        /// The new name (1–64 characters, no control characters).
        name: String,
    },
    /// Choose a search radius smaller than the node's (in metres).
    SetRadius {
        /// The radius; the node's maximum if larger.
        meters: u32,
    },
    /// Liveness check.
    Ping,
    /// Dev mode only, allowed before `Hello`: a token for any user (registered on first use).
    /// A node not in dev mode answers [`ErrorCode::Forbidden`].
    DevLogin {
        /// The user to log in as.
        user: UserId,
    },
    /// Let opted-in strangers nearby see you (a display name, a distance rounded to 500 m, a
    /// pseudonym — never your id or position), or stop it.
    SetDiscoverable {
        /// On or off.
        on: bool,
    },
    /// Ghost mode: hidden from everyone (friends, followers, strangers) for a while, until
    /// turned off, or no more. Answered with [`Response::Ghost`].
    SetGhost {
        /// For how long.
        mode: GhostMode,
    },
    /// Let `user` follow you: they see your location like a friend's; you see nothing of them.
    AllowFollower {
        /// The follower.
        user: UserId,
    },
    /// Stop letting `user` follow you (takes effect at once, like hiding).
    RevokeFollower {
        /// The follower.
        user: UserId,
    },
    /// Stop following `user`.
    Unfollow {
        /// The user you follow.
        user: UserId,
    },
    /// The nearest discoverable strangers in range (never friends or users you follow),
    /// answered with [`Response::Strangers`]. The first one of a session also starts live
    /// [`Event::StrangerNearby`] / [`Event::StrangerGone`] events for the nearest page, until the
    /// session ends. Needs a live location ([`ErrorCode::NotStarted`] otherwise).
    ListStrangers {
        /// Entries wanted (the nearest ones); the node's default (20) if `None`, at most 100.
        page_size: Option<u16>,
    },
    /// The user's own location history with `since <= recorded_at < until`, oldest first.
    /// Answered with [`Response::History`].
    ReadHistory {
        /// From (inclusive); the beginning if `None`.
        since: Option<Millis>,
        /// To (exclusive); now if `None`.
        until: Option<Millis>,
        /// At most this many points ([`MAX_HISTORY_PAGE`] if `None` or larger).
        limit: Option<u32>,
    },
    /// Deletes all of the user's location history, for real (from every node's disk).
    DeleteHistory,
    /// Turns recording of the user's location history on or off (on by default).
    SetHistory {
        /// On or off.
        on: bool,
    },
    /// A fresh token for the session's user, before the one `Hello` gave expires (see
    /// [`Event::TokenExpiring`]): the session goes on under it.
    Renew {
        /// The new token.
        token: String,
    },
}

/// The most points one [`Response::History`] carries.
pub const MAX_HISTORY_PAGE: u32 = 1_000;

/// The most users one [`FriendList`] page names (each with up to three entries: the largest
/// page, with 64-character names, still fits a frame).
pub const MAX_FRIENDS_PAGE: u16 = 64;

/// How long ghost mode lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GhostMode {
    /// Visible again now.
    Off,
    /// Hidden for this many seconds (1 s to [`MAX_GHOST_S`]), then visible again by itself.
    For {
        /// The duration.
        seconds: u64,
    },
    /// Hidden until turned off.
    On,
}

/// The longest timed ghost mode, in seconds (a year); longer is refused with
/// [`ErrorCode::InvalidArgument`] (use [`GhostMode::On`]).
pub const MAX_GHOST_S: u64 = 366 * 24 * 3600;

/// [`GhostMode::On`] as an end time: never, until turned off.
pub const GHOST_FOREVER: Millis = Millis(u64::MAX);

/// What a node answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// The session is authenticated.
    Welcome(SessionInfo),
    /// The answer to the session's first [`Request::UpdateLocation`]: the first page.
    Started {
        /// Friends in range, nearest first.
        page: NearbyPage,
        /// When the node wants the next update, in seconds (battery-aware cadence).
        next_update_s: u32,
    },
    /// A later location update was stored.
    Located {
        /// When the node wants the next update, in seconds (battery-aware cadence).
        next_update_s: u32,
    },
    /// A page of friends in range.
    Nearby(NearbyPage),
    /// The user's relations.
    Friends(FriendList),
    /// A change was committed.
    Done(Outcome),
    /// Answer to [`Request::Ping`].
    Pong,
    /// The request failed; nothing changed.
    Error(ErrorBody),
    /// This node does not serve the user; connect to `addr` instead.
    Redirect(Redirect),
    /// Answer to [`Request::DevLogin`].
    Token {
        /// The signed token, for `Hello`.
        token: String,
        /// When it stops being accepted.
        expires_at: Millis,
    },
    /// Answer to [`Request::SetGhost`]: ghost mode is in force until this time
    /// ([`GHOST_FOREVER`]: until turned off), or off (`None`).
    Ghost {
        /// The end of ghost mode.
        until: Option<Millis>,
    },
    /// Answer to [`Request::ListStrangers`].
    Strangers(StrangerPage),
    /// Answer to [`Request::ReadHistory`].
    History(HistoryPage),
}

/// Where the user was, and when.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Where.
    pub at: Coord,
    /// When the node accepted the location.
    pub recorded_at: Millis,
}

/// A stretch of the user's location history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    /// Oldest first.
    pub points: Vec<HistoryPoint>,
    /// More points in the range after the last one (ask again from its time + 1).
    pub more: bool,
    /// Every node holding a part of the history answered; `false` when one could not be
    /// reached (its points are missing from this answer, not lost).
    pub complete: bool,
}

/// A discoverable user nearby who is not a friend, as a viewer may see them: no user id, no
/// position, a distance rounded up to [`STRANGER_STEP_M`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stranger {
    /// Stable for this viewer and this stranger (across sessions, nodes and restarts); another
    /// viewer gets another one for the same stranger.
    pub pseudonym: String,
    /// Their display name.
    pub name: String,
    /// Distance from the viewer rounded up to a multiple of [`STRANGER_STEP_M`] (500 for
    /// anything up to 500 m).
    pub distance_m: u32,
    /// When they were there.
    pub updated_at: Millis,
}

/// The nearest strangers and how many more are in range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StrangerPage {
    /// Nearest first.
    pub strangers: Vec<Stranger>,
    /// Strangers in range beyond this page.
    pub more: u32,
}

/// The step strangers' distances are rounded up to, in metres.
pub const STRANGER_STEP_M: u32 = 500;

/// Session parameters the node chose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The authenticated user.
    pub user: UserId,
    /// The search radius in force, in metres.
    pub radius_m: u32,
    /// After how long without an update a user counts as inactive, in seconds.
    pub ttl_s: u32,
    /// Entries per page by default.
    pub page_size: u16,
    /// When the node wants the first update, in seconds.
    pub next_update_s: u32,
}

/// One friend (or followed user) in a list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearbyFriend {
    /// The friend.
    pub id: UserId,
    /// [`Relation::Friend`], or [`Relation::Following`] for a user you follow.
    pub relation: Relation,
    /// Their display name.
    pub name: String,
    /// Distance from the viewer, in metres.
    pub distance_m: f64,
    /// When the friend's location was last updated.
    pub updated_at: Millis,
}

/// A page of friends in range.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NearbyPage {
    /// Nearest first.
    pub friends: Vec<NearbyFriend>,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

/// How another user relates to the session's user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Relation {
    /// Mutual friends.
    Friend,
    /// They asked; the user has not answered.
    RequestReceived,
    /// The user asked; they have not answered.
    RequestSent,
    /// The user lets them follow: they see the user, the user does not see them.
    Follower,
    /// They let the user follow them: the user sees them, they do not see the user.
    Following,
}

/// One entry of [`FriendList`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FriendEntry {
    /// The other user.
    pub id: UserId,
    /// Their display name, when known.
    pub name: Option<String>,
    /// The relation.
    pub relation: Relation,
    /// Whether the user hides from them.
    pub hidden: bool,
}

/// The user's relations and privacy settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FriendList {
    /// Ascending by id, then relation (a friend may also be a follower).
    pub entries: Vec<FriendEntry>,
    /// Whether the user shares their location.
    pub sharing: bool,
    /// Whether opted-in strangers nearby may see the user.
    pub discoverable: bool,
    /// Ghost mode's end, if in force ([`GHOST_FOREVER`]: until turned off).
    pub ghost_until: Option<Millis>,
    /// Whether the user's location history is recorded.
    pub history: bool,
    /// Ask for the next page with `after: next`; `None` on the last page.
    pub next: Option<UserId>,
}

/// What a committed change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The change was made.
    Updated,
    /// Nothing to change: it already was so.
    Unchanged,
    /// A friend request is pending with the other user.
    FriendRequestSent,
    /// Both asked: now friends.
    FriendshipFormed,
    /// Already friends.
    AlreadyFriends,
    /// The friendship or request is gone.
    FriendRemoved,
}

/// Where to reconnect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    /// `host:port` of the node to use.
    pub addr: String,
    /// Why (for logs).
    pub reason: String,
}

/// A failed request: a stable code and a human message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable, for programs.
    pub code: ErrorCode,
    /// For people; may change between versions.
    pub message: String,
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.name(), self.code as u16, self.message)
    }
}

/// Stable error codes. Numbers never change meaning; new codes are added at the end. On the wire
/// a code is its number (a `u16`), not its position in the enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
#[repr(u16)]
pub enum ErrorCode {
    /// The bytes are not a valid frame or message. The node closes the connection after it.
    BadFrame = 1,
    /// The frame is larger than the limit. The node closes the connection after it.
    FrameTooLarge = 2,
    /// The client's protocol version is not supported.
    UnsupportedVersion = 3,
    /// A request before a successful `Hello`.
    NotAuthenticated = 4,
    /// The token has expired: get a new one.
    TokenExpired = 5,
    /// The token is forged, malformed, or signed by another key.
    TokenInvalid = 6,
    /// The request acts for a user the session is not.
    Forbidden = 7,
    /// Latitude/longitude NaN, infinite, or out of range.
    InvalidCoordinates = 8,
    /// The named user does not exist.
    UnknownUser = 9,
    /// An argument is invalid (self-friendship, bad name, bad cursor, …).
    InvalidArgument = 10,
    /// Too many requests: slow down.
    RateLimited = 11,
    /// Temporarily unavailable (no leader, shutting down): retry with backoff.
    Unavailable = 12,
    /// A bug on the node. Retrying may help.
    Internal = 13,
    /// The request needs a started session (send a location first).
    NotStarted = 14,
    /// `Hello` sent twice.
    AlreadyAuthenticated = 15,
    /// The user has as many sessions open on the node as it allows: close one first.
    TooManySessions = 16,
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c as u16
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;

    fn try_from(n: u16) -> Result<Self, String> {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| *c as u16 == n)
            .ok_or_else(|| format!("unknown error code {n}"))
    }
}

impl ErrorCode {
    /// Every code, in number order.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::NotAuthenticated,
        ErrorCode::TokenExpired,
        ErrorCode::TokenInvalid,
        ErrorCode::Forbidden,
        ErrorCode::InvalidCoordinates,
        ErrorCode::UnknownUser,
        ErrorCode::InvalidArgument,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::NotStarted,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::TooManySessions,
    ];

    /// The code's stable name, as the CLI prints it.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidCoordinates => "invalid_coordinates",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotStarted => "not_started",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::TooManySessions => "too_many_sessions",
        }
    }
}

/// Why a friend disappeared from the user's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoneReason {
    /// No update for the inactivity timeout.
    Inactive,
    /// The friendship ended.
    Unfriended,
    /// The friend hid from the user, turned sharing off, or went ghost.
    Hidden,
}

/// One push on the event stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A friend already in range moved.
    FriendMoved(FriendPosition),
    /// A friend came into range (or became visible).
    FriendEntered(FriendPosition),
    /// A friend in range moved out of it.
    FriendLeft {
        /// The friend.
        id: UserId,
        /// Their new distance, in metres.
        distance_m: f64,
        /// When they moved.
        updated_at: Millis,
    },
    /// A friend is no longer shown, for `reason`. Nothing more about them is sent until they
    /// are visible again.
    FriendGone {
        /// The friend.
        id: UserId,
        /// Why.
        reason: GoneReason,
    },
    /// Someone asked the user to be friends.
    FriendRequest {
        /// Who asked.
        from: UserId,
    },
    /// The node wants location updates at a new cadence.
    Cadence {
        /// Seconds until the next update.
        next_update_s: u32,
    },
    /// The node is going away: reconnect (to `redirect`, if given) after the delay.
    Shutdown {
        /// Milliseconds to wait before reconnecting (spreads reconnections).
        reconnect_after_ms: u32,
        /// Another node to use, if known.
        redirect: Option<String>,
    },
    /// A stranger entered the viewer's nearest page, or moved within it (upsert by pseudonym).
    StrangerNearby(Stranger),
    /// A stranger left the viewer's nearest page (moved away or out of the page, stopped being
    /// discoverable, went ghost or inactive). Nothing more about them comes until they are
    /// shown again.
    StrangerGone {
        /// Whom.
        pseudonym: String,
    },
    /// The session's token expires at `expires_at`: send [`Request::Renew`] with a fresh one
    /// before then, or the node closes the connection (application code 3).
    TokenExpiring {
        /// When (ms since the epoch, the node's clock).
        expires_at: Millis,
    },
}

/// A friend's position as pushed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FriendPosition {
    /// The friend.
    pub id: UserId,
    /// Where they are.
    pub at: Coord,
    /// Distance from the user, in metres.
    pub distance_m: f64,
    /// When they were there.
    pub updated_at: Millis,
}

impl Event {
    /// The friend an event is about, if any.
    pub fn friend(&self) -> Option<UserId> {
        match self {
            Event::FriendMoved(p) | Event::FriendEntered(p) => Some(p.id),
            Event::FriendLeft { id, .. } | Event::FriendGone { id, .. } => Some(*id),
            Event::FriendRequest { from } => Some(*from),
            Event::Cadence { .. }
            | Event::Shutdown { .. }
            | Event::StrangerNearby(_)
            | Event::StrangerGone { .. }
            | Event::TokenExpiring { .. } => None,
        }
    }

    /// The stranger an event is about, by pseudonym, if any.
    pub fn stranger(&self) -> Option<&str> {
        match self {
            Event::StrangerNearby(s) => Some(&s.pseudonym),
            Event::StrangerGone { pseudonym } => Some(pseudonym),
            _ => None,
        }
    }
}
