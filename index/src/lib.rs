//! The pure core of nearby: who is where, who is whose friend, and who is near whom.
//!
//! Everything in this crate is a plain data structure or function: no I/O, no async, no
//! threads, no clock reads. Time is always a [`Millis`] parameter. The raft state machine
//! (`nearby-raft`) applies commands to these structures and the node (`nearby-node`) reads them
//! to answer requests; both own every side effect.
//!
//! # Layout
//!
//! - [`codec`]: the one place that turns values into bytes and back (bincode, bounded and
//!   strict); every other crate encodes through it.
//! - [`geo`]: validated coordinates ([`LatLng`]), great-circle distance, [`UserId`], [`Millis`].
//! - [`ttl`]: the latest-location table ([`LocationTable`]) whose entries expire after a TTL,
//!   through an ordered expiry queue rather than scans.
//! - [`friends`]: friend sets, Elias–Fano coded ([`FriendSet`]), user-id ranges and the table
//!   of which shard group owns which range ([`RangeTable`]), and the one-pass split of a friend
//!   set by owner.
//! - [`query`]: the nearby page — filter by radius, nearest first, paged with an opaque
//!   [`Cursor`] whose guarantee under movement is documented there.
//! - [`activity`]: located users counted by coarse H3 cell ([`CellCounts`]), counts only, for
//!   an operator's map of activity.
//! - [`cells`]: H3 cells, the resolution policy, and the radius cover of a cell used by the
//!   "nearby random users" channels.
//! - [`error`]: the typed errors of all of the above.

pub mod activity;
pub mod cells;
pub mod codec;
pub mod error;
pub mod friends;
pub mod geo;
pub mod hash;
pub mod query;
pub mod ttl;

pub use activity::{CellCounts, ACTIVITY_RESOLUTION};
pub use cells::{CellIndexer, DEFAULT_RESOLUTION};
pub use error::{CellError, CodecError, GeoError, QueryError, RangeError};
pub use friends::{FriendSet, RangeSplit, RangeTable, UserRange};
pub use geo::{check_user_id, LatLng, Millis, UserId};
pub use query::{nearby_page, Cursor, NearbyEntry, NearbyQuery, Page, DEFAULT_PAGE_SIZE};
pub use ttl::{LatestLocation, LocationTable, SetOutcome};
