//! Every error type the index can return, in one place.
//!
//! Owns the typed errors of all modules so that callers (the raft state machine, the node's
//! request handlers) can match on one vocabulary. Errors are cheap enums with structured fields
//! and messages that name the bad input; none of them carries a boxed source or a backtrace, so
//! they are safe to return from hot paths. This module must never grow constructors with side
//! effects (logging, metrics): reporting is the caller's job.

use thiserror::Error;

use crate::friends::UserRange;

/// A value could not be turned into bytes, or bytes could not be turned back into a value.
///
/// The messages never contain the bytes themselves, only what was wrong with them, so a
/// malformed request can be reported without echoing attacker-controlled data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The value could not be serialised (e.g. a map whose length is not known up front).
    #[error("cannot encode value: {reason}")]
    Encode {
        /// What the serialiser reported.
        reason: String,
    },
    /// The bytes are not a valid encoding of the requested type (truncated, bad tag, invalid
    /// UTF-8, a field that failed validation, …).
    #[error("cannot decode {total} bytes: {reason}")]
    Decode {
        /// Length of the input.
        total: usize,
        /// What the deserialiser reported.
        reason: String,
    },
    /// Decoding would need more than [`crate::codec::MAX_DECODE_BYTES`] bytes of memory, for
    /// instance because a length prefix claims a huge collection.
    #[error("decoding {total} bytes would exceed the {limit}-byte decode limit")]
    TooLarge {
        /// Length of the input.
        total: usize,
        /// The limit that was hit.
        limit: usize,
    },
    /// A value decoded cleanly but did not use all of the input.
    #[error("{trailing} trailing bytes after a value of {consumed} bytes")]
    TrailingBytes {
        /// Bytes consumed by the value.
        consumed: usize,
        /// Bytes left over.
        trailing: usize,
    },
}

/// A coordinate, user id or radius is outside what the index accepts.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[non_exhaustive]
pub enum GeoError {
    /// The latitude is NaN, infinite or outside `[-90, 90]`.
    #[error("latitude {lat} is out of range [-90, 90]")]
    Latitude {
        /// The rejected latitude, in degrees.
        lat: f64,
    },
    /// The longitude is NaN, infinite or outside `[-180, 180]`.
    #[error("longitude {lon} is out of range [-180, 180]")]
    Longitude {
        /// The rejected longitude, in degrees.
        lon: f64,
    },
    /// User id 0 is reserved and never names a user.
    #[error("user id {id} is reserved and cannot name a user")]
    ReservedUserId {
        /// The rejected id (always 0 today).
        id: u64,
    },
    /// A radius is NaN, infinite, negative, or larger than the index supports.
    #[error("radius {radius_m} m is out of range [0, {max_m}] m")]
    Radius {
        /// The rejected radius, in metres.
        radius_m: f64,
        /// The largest radius accepted here, in metres.
        max_m: f64,
    },
}

/// A user range or range table is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RangeError {
    /// `start >= end`: a half-open range `[start, end)` must hold at least one id.
    #[error("user range [{start}, {end}) is empty: start must be below end")]
    Empty {
        /// The rejected start (inclusive).
        start: u64,
        /// The rejected end (exclusive).
        end: u64,
    },
    /// Two ranges of a table share at least one id.
    #[error("user ranges {first} and {second} overlap")]
    Overlap {
        /// The range that starts first.
        first: UserRange,
        /// The range that starts inside `first`.
        second: UserRange,
    },
}

/// A nearby-page request or its cursor is invalid.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The search radius is NaN, infinite, not positive, or above
    /// [`crate::query::MAX_RADIUS_M`].
    #[error("search radius {radius_m} m is out of range (0, {max_m}] m")]
    Radius {
        /// The rejected radius, in metres.
        radius_m: f64,
        /// The largest accepted radius, in metres.
        max_m: f64,
    },
    /// The page size is 0 or above [`crate::query::MAX_PAGE_SIZE`].
    #[error("page size {page_size} is out of range [1, {max}]")]
    PageSize {
        /// The rejected page size.
        page_size: usize,
        /// The largest accepted page size.
        max: usize,
    },
    /// A cursor token is not one this index produced (bad alphabet, bad length, does not decode,
    /// wrong version, or carries invalid values). Clients should restart from the first page.
    #[error("invalid cursor token: {reason}")]
    BadCursor {
        /// What was wrong with the token (never echoes the token itself).
        reason: &'static str,
    },
}

/// A cell cover cannot be computed for the requested radius.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
#[non_exhaustive]
pub enum CellError {
    /// The radius is NaN, infinite or negative.
    #[error("cover radius {radius_m} m is not a finite, non-negative number")]
    Radius {
        /// The rejected radius, in metres.
        radius_m: f64,
    },
    /// Covering the radius would need a grid disk wider than
    /// [`crate::cells::MAX_COVER_K`] rings at this resolution (use a coarser resolution).
    #[error("cover radius {radius_m} m needs more than {max_k} rings at resolution {resolution}")]
    TooWide {
        /// The rejected radius, in metres.
        radius_m: f64,
        /// The resolution of the cell being covered.
        resolution: u8,
        /// The largest disk radius, in rings, that a cover may use.
        max_k: u32,
    },
}
