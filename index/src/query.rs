//! The nearby page: which friends are within the radius, nearest first, a page at a time.
//!
//! Owns [`NearbyQuery`], [`nearby_page`], [`Page`] and the opaque paging [`Cursor`]. It is a
//! pure function of its inputs: the caller (the shard that holds the locations) passes the
//! candidates — friends the viewer is allowed to see, with their latest locations — and this
//! module filters, orders and pages them. It never decides who may see whom, never reads a
//! clock, and never holds state between pages: everything a later page needs is in the cursor.
//!
//! # Order
//!
//! Entries are ordered by the key `(distance from the origin, user id)`: nearest first, ties
//! broken by ascending user id. The *origin* is the viewer's position when the first page was
//! requested; later pages keep measuring from it (and report `distance_m` from it), so the order
//! does not reshuffle under the reader's thumb when the viewer walks while scrolling.
//!
//! # What "correct" means while locations change between pages
//!
//! Paging is keyset pagination plus a seen-set. The cursor holds the origin, the key of the last
//! entry shown, and (for walks of up to [`MAX_CURSOR_SEEN`] entries) the ids already shown. A
//! later page shows the candidates whose key is *after* the cursor's key and who are not in the
//! seen-set. Consequently, for one walk (first page, then following `next` cursors):
//!
//! 1. **Radius.** An entry is shown only if, at the time of *its* page, the friend is within
//!    `radius_m` of the origin *and* of the viewer's current position. Nobody outside the radius
//!    is ever shown, even with a forged or replayed cursor whose origin is elsewhere: the live
//!    viewer position always bounds what is revealed.
//! 2. **Order.** Across all pages of a walk, entries are in non-decreasing key order.
//! 3. **Stable friends are shown exactly once.** Every friend whose location did not change
//!    during the walk, and who stayed within the radius of the viewer, is shown exactly once.
//! 4. **Moved friends.** A friend whose location changed between pages is shown at their new
//!    position if their new key falls after the cursor's key and they were not shown before; a
//!    friend already shown is never shown again (the seen-set), so there are **no duplicates**
//!    within the first [`MAX_CURSOR_SEEN`] entries of a walk. A friend who was not yet shown and
//!    moved to a key at or before the cursor's key is **skipped** for the rest of this walk —
//!    the live event stream delivers their new position instead. A friend who left the radius,
//!    expired, or is no longer a candidate, is simply not shown.
//! 5. **Very long walks.** Past [`MAX_CURSOR_SEEN`] entries the seen-set is dropped to keep the
//!    token small (≤ [`MAX_TOKEN_LEN`]), and paging falls back to pure keyset: a friend shown
//!    earlier who moved to a key after the cursor may then be shown a second time (at their new
//!    position). Stable friends are still shown exactly once.
//!
//! The cursor is opaque but not authenticated; rule 1 makes a forged cursor harmless for
//! privacy (it can only re-order friends the viewer may see anyway within their radius). A node
//! that must also stop clients from choosing the ordering origin can seal tokens with a MAC.
//!
//! # Cost
//!
//! A latitude-band test, then at most two haversines per candidate, and a bounded max-heap of `page_size + 1` entries:
//! O(c log p) time and O(p) memory for c candidates and page size p, instead of sorting all c.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde::{Deserialize, Serialize};

use crate::codec::{self, base64url_decode, base64url_encode};
use crate::error::QueryError;
use crate::geo::{LatLng, Millis, UserId, EARTH_RADIUS_M};
use crate::ttl::LatestLocation;

/// Entries per page unless the query says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 20;
/// The largest page a query may ask for.
pub const MAX_PAGE_SIZE: usize = 500;
/// The largest radius a query may ask for: half the Earth's circumference (every point).
pub const MAX_RADIUS_M: f64 = std::f64::consts::PI * EARTH_RADIUS_M;
/// How many shown ids a cursor remembers to suppress duplicates (see the module doc, rule 5).
pub const MAX_CURSOR_SEEN: usize = 200;
/// The longest cursor token [`Cursor::from_token`] accepts, in characters.
pub const MAX_TOKEN_LEN: usize = 4096;

const CURSOR_VERSION: u8 = 1;

/// A request for one page of nearby friends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NearbyQuery {
    /// Where the viewer is now.
    pub viewer: LatLng,
    /// Search radius in metres, in `(0, MAX_RADIUS_M]`.
    pub radius_m: f64,
    /// Entries per page, in `[1, MAX_PAGE_SIZE]`.
    pub page_size: usize,
}

impl NearbyQuery {
    /// A query with [`DEFAULT_PAGE_SIZE`].
    pub fn new(viewer: LatLng, radius_m: f64) -> Self {
        Self {
            viewer,
            radius_m,
            page_size: DEFAULT_PAGE_SIZE,
        }
    }

    fn validate(&self) -> Result<(), QueryError> {
        if !(self.radius_m > 0.0 && self.radius_m <= MAX_RADIUS_M) {
            return Err(QueryError::Radius {
                radius_m: self.radius_m,
                max_m: MAX_RADIUS_M,
            });
        }
        if !(1..=MAX_PAGE_SIZE).contains(&self.page_size) {
            return Err(QueryError::PageSize {
                page_size: self.page_size,
                max: MAX_PAGE_SIZE,
            });
        }
        Ok(())
    }
}

/// One friend on a page.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NearbyEntry {
    /// The friend.
    pub user: UserId,
    /// Distance from the walk's origin (the viewer's position at the first page), in metres.
    pub distance_m: f64,
    /// When the friend's location was taken.
    pub updated_at: Millis,
}

/// One page of results.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// Nearest first; ties by ascending user id.
    pub entries: Vec<NearbyEntry>,
    /// Where the next page starts, or `None` if this page is the last.
    pub next: Option<Cursor>,
}

/// Where the next page of a walk starts. Opaque: pass it back, or carry it as a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    origin: LatLng,
    last_distance_m: f64,
    last_user: UserId,
    /// Ids shown so far in this walk, strictly ascending; `None` once the walk outgrew
    /// [`MAX_CURSOR_SEEN`].
    seen: Option<Vec<UserId>>,
}

#[derive(Serialize, Deserialize)]
struct CursorWire {
    version: u8,
    origin: LatLng,
    last_distance_m: f64,
    last_user: UserId,
    seen: Option<Vec<UserId>>,
}

impl Cursor {
    /// The viewer position that the walk measures distances from.
    pub fn origin(&self) -> LatLng {
        self.origin
    }

    /// A URL-safe token (base64url without padding) for this cursor.
    pub fn to_token(&self) -> String {
        let wire = CursorWire {
            version: CURSOR_VERSION,
            origin: self.origin,
            last_distance_m: self.last_distance_m,
            last_user: self.last_user,
            seen: self.seen.clone(),
        };
        // Encoding this plain struct cannot fail; if it ever did, the empty token would be
        // rejected by `from_token` and the client would restart from the first page.
        base64url_encode(&codec::encode(&wire).unwrap_or_default())
    }

    /// Parses a token made by [`Cursor::to_token`].
    ///
    /// # Errors
    /// [`QueryError::BadCursor`] for anything else: too long, not base64url, does not decode,
    /// unknown version, invalid origin, distance or seen-set.
    pub fn from_token(token: &str) -> Result<Cursor, QueryError> {
        let bad = |reason| QueryError::BadCursor { reason };
        if token.len() > MAX_TOKEN_LEN {
            return Err(bad("token too long"));
        }
        let bytes = base64url_decode(token).ok_or(bad("not base64url"))?;
        let wire: CursorWire = codec::decode(&bytes).map_err(|_| bad("does not decode"))?;
        if wire.version != CURSOR_VERSION {
            return Err(bad("unknown version"));
        }
        if !(0.0..=MAX_RADIUS_M).contains(&wire.last_distance_m) {
            return Err(bad("distance out of range"));
        }
        if let Some(seen) = &wire.seen {
            if seen.len() > MAX_CURSOR_SEEN || !seen.windows(2).all(|w| w[0] < w[1]) {
                return Err(bad("malformed seen-set"));
            }
        }
        Ok(Cursor {
            origin: wire.origin,
            last_distance_m: wire.last_distance_m,
            last_user: wire.last_user,
            seen: wire.seen,
        })
    }

    fn key(&self) -> Key {
        Key {
            distance_m: self.last_distance_m,
            user: self.last_user,
        }
    }

    fn has_seen(&self, user: UserId) -> bool {
        self.seen.as_ref().is_some_and(|s| s.binary_search(&user).is_ok())
    }
}

/// The ordering key: distance from the origin, then user id.
#[derive(Debug, Clone, Copy)]
struct Key {
    distance_m: f64,
    user: UserId,
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance_m
            .total_cmp(&other.distance_m)
            .then(self.user.cmp(&other.user))
    }
}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Key {}

/// A heap item ordered by key only.
struct Item(Key, Millis);
impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.cmp(&other.0)
    }
}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Item {}

/// Computes one page of nearby friends; see the module doc for the exact paging guarantee.
///
/// `candidates` are the friends the viewer may see, each with their latest location, each user
/// at most once (a user listed twice may be shown twice). Pass `cursor = None` for the first
/// page and `page.next` for the following ones.
///
/// # Errors
/// [`QueryError::Radius`] or [`QueryError::PageSize`] for an invalid query.
pub fn nearby_page(
    query: &NearbyQuery,
    candidates: impl IntoIterator<Item = (UserId, LatestLocation)>,
    cursor: Option<&Cursor>,
) -> Result<Page, QueryError> {
    query.validate()?;
    let origin = cursor.map_or(query.viewer, |c| c.origin);
    let moved = origin != query.viewer;
    let after = cursor.map(Cursor::key);
    let cap = query.page_size + 1;
    let mut heap: BinaryHeap<Item> = BinaryHeap::with_capacity(cap);
    // The great-circle distance is at least R × |Δlatitude|: a free test that discards most
    // far candidates (friends in other cities) before the trigonometry.
    let max_dlat = (query.radius_m / EARTH_RADIUS_M).to_degrees();
    for (user, latest) in candidates {
        let far = |p: LatLng| (p.lat() - latest.loc.lat()).abs() > max_dlat;
        if far(origin) || (moved && far(query.viewer)) {
            continue;
        }
        let distance_m = origin.distance_m(&latest.loc);
        if distance_m > query.radius_m || (moved && query.viewer.distance_m(&latest.loc) > query.radius_m) {
            continue;
        }
        let key = Key { distance_m, user };
        if after.is_some_and(|a| key <= a) || cursor.is_some_and(|c| c.has_seen(user)) {
            continue;
        }
        if heap.len() < cap {
            heap.push(Item(key, latest.updated_at));
        } else if let Some(mut top) = heap.peek_mut() {
            if key < top.0 {
                *top = Item(key, latest.updated_at);
            }
        }
    }
    let mut items = heap.into_sorted_vec();
    let more = items.len() > query.page_size;
    items.truncate(query.page_size);
    let entries: Vec<NearbyEntry> = items
        .iter()
        .map(|Item(k, at)| NearbyEntry {
            user: k.user,
            distance_m: k.distance_m,
            updated_at: *at,
        })
        .collect();
    let next = match (more, entries.last()) {
        (true, Some(last)) => Some(Cursor {
            origin,
            last_distance_m: last.distance_m,
            last_user: last.user,
            seen: next_seen(cursor, &entries),
        }),
        _ => None,
    };
    Ok(Page { entries, next })
}

/// The seen-set after showing `entries`, or `None` once it outgrows [`MAX_CURSOR_SEEN`].
fn next_seen(cursor: Option<&Cursor>, entries: &[NearbyEntry]) -> Option<Vec<UserId>> {
    let prev: &[UserId] = match cursor {
        None => &[],
        Some(c) => c.seen.as_deref()?,
    };
    if prev.len() + entries.len() > MAX_CURSOR_SEEN {
        return None;
    }
    let mut seen = Vec::with_capacity(prev.len() + entries.len());
    seen.extend_from_slice(prev);
    seen.extend(entries.iter().map(|e| e.user));
    seen.sort_unstable();
    seen.dedup();
    Some(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const R: f64 = 8_000.0;

    fn origin() -> LatLng {
        LatLng::new(48.8566, 2.3522).unwrap()
    }

    /// A point `d` metres north of the origin.
    fn north(d: f64) -> LatLng {
        LatLng::new(origin().lat() + (d / EARTH_RADIUS_M).to_degrees(), origin().lon()).unwrap()
    }

    fn loc(p: LatLng) -> LatestLocation {
        LatestLocation {
            loc: p,
            updated_at: Millis(7),
        }
    }

    fn walk(q: &NearbyQuery, cands: &[(UserId, LatestLocation)]) -> Vec<Vec<UserId>> {
        let mut pages = vec![];
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = nearby_page(q, cands.iter().copied(), cursor.as_ref()).unwrap();
            pages.push(page.entries.iter().map(|e| e.user).collect());
            match page.next {
                // Round-trip through the token, as a client would.
                Some(c) => cursor = Some(Cursor::from_token(&c.to_token()).unwrap()),
                None => return pages,
            }
        }
    }

    #[test]
    fn pages_20_20_5() {
        let cands: Vec<_> = (1..=45u64)
            .map(|u| (u, loc(north(100.0 * (46 - u) as f64))))
            .collect();
        let pages = walk(&NearbyQuery::new(origin(), R), &cands);
        assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), vec![20, 20, 5]);
        let all: Vec<UserId> = pages.concat();
        assert_eq!(all, (1..=45u64).rev().collect::<Vec<_>>());
    }

    #[test]
    fn radius_filter_and_distances() {
        let cands = vec![
            (1, loc(north(7_999.0))),
            (2, loc(north(8_001.0))),
            (3, loc(north(0.0))),
        ];
        let page = nearby_page(&NearbyQuery::new(origin(), R), cands, None).unwrap();
        assert_eq!(page.entries.len(), 2);
        assert_eq!(page.entries[0].user, 3);
        assert_eq!(page.entries[0].distance_m, 0.0);
        assert_eq!(page.entries[1].user, 1);
        assert!((page.entries[1].distance_m - 7_999.0).abs() < 0.01);
        assert_eq!(page.entries[1].updated_at, Millis(7));
        assert!(page.next.is_none());
    }

    #[test]
    fn ties_break_by_user_id_across_pages() {
        let cands: Vec<_> = [9u64, 3, 7, 1, 5]
            .iter()
            .map(|&u| (u, loc(north(50.0))))
            .collect();
        let q = NearbyQuery {
            page_size: 2,
            ..NearbyQuery::new(origin(), R)
        };
        assert_eq!(walk(&q, &cands), vec![vec![1, 3], vec![5, 7], vec![9]]);
    }

    #[test]
    fn exact_page_size_has_no_next() {
        let cands: Vec<_> = (1..=20u64).map(|u| (u, loc(north(u as f64)))).collect();
        let page = nearby_page(&NearbyQuery::new(origin(), R), cands, None).unwrap();
        assert_eq!(page.entries.len(), 20);
        assert!(page.next.is_none());
    }

    #[test]
    fn moving_candidates_between_pages() {
        // Users 1..=4 at 100, 200, 300, 400 m; page size 2.
        let mut cands: Vec<_> = (1..=4u64).map(|u| (u, loc(north(100.0 * u as f64)))).collect();
        let q = NearbyQuery {
            page_size: 2,
            ..NearbyQuery::new(origin(), R)
        };
        let p1 = nearby_page(&q, cands.iter().copied(), None).unwrap();
        assert_eq!(p1.entries.iter().map(|e| e.user).collect::<Vec<_>>(), [1, 2]);
        // User 1 (shown) moves far: not shown again. User 4 (not shown) moves to 250 m: shown
        // at the new position. User 3 (not shown) moves to 50 m, before the cursor: skipped.
        cands[0].1 = loc(north(5_000.0));
        cands[3].1 = loc(north(250.0));
        cands[2].1 = loc(north(50.0));
        let p2 = nearby_page(&q, cands.iter().copied(), p1.next.as_ref()).unwrap();
        assert_eq!(p2.entries.iter().map(|e| e.user).collect::<Vec<_>>(), [4]);
        assert!((p2.entries[0].distance_m - 250.0).abs() < 0.01);
        assert!(p2.next.is_none());
    }

    #[test]
    fn viewer_moving_keeps_origin_but_bounds_radius() {
        let cands: Vec<_> = (1..=4u64)
            .map(|u| (u, loc(north(2_000.0 * u as f64 - 1_000.0))))
            .collect(); // 1, 3, 5, 7 km north
        let q = NearbyQuery {
            page_size: 1,
            ..NearbyQuery::new(origin(), R)
        };
        let p1 = nearby_page(&q, cands.iter().copied(), None).unwrap();
        assert_eq!(p1.entries[0].user, 1);
        // The viewer walks 4 km south: users 3 and 4 (5 and 7 km north of the origin) are now 9
        // and 11 km away, outside the radius, though within it from the origin.
        let q2 = NearbyQuery {
            viewer: north(-4_000.0),
            ..q
        };
        let mut shown = vec![1];
        let mut cursor = p1.next;
        while let Some(c) = cursor {
            assert_eq!(c.origin(), origin());
            let p = nearby_page(&q2, cands.iter().copied(), Some(&c)).unwrap();
            shown.extend(p.entries.iter().map(|e| e.user));
            cursor = p.next;
        }
        assert_eq!(shown, vec![1, 2]);
    }

    #[test]
    fn forged_origin_cannot_reveal_far_friends() {
        let far = LatLng::new(-33.8688, 151.2093).unwrap();
        let forged = Cursor {
            origin: far,
            last_distance_m: 0.0,
            last_user: 0,
            seen: Some(vec![]),
        };
        let cands = vec![(1, loc(far))];
        let page = nearby_page(&NearbyQuery::new(origin(), R), cands, Some(&forged)).unwrap();
        assert!(page.entries.is_empty());
    }

    #[test]
    fn long_walk_drops_seen_set_but_stays_exact() {
        let cands: Vec<_> = (1..=450u64).map(|u| (u, loc(north(u as f64)))).collect();
        let q = NearbyQuery {
            page_size: 150,
            ..NearbyQuery::new(origin(), R)
        };
        let pages = walk(&q, &cands);
        assert_eq!(pages.concat(), (1..=450u64).collect::<Vec<_>>());
    }

    #[test]
    fn invalid_queries() {
        let mut q = NearbyQuery::new(origin(), R);
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY, MAX_RADIUS_M * 1.01] {
            q.radius_m = r;
            assert!(matches!(
                nearby_page(&q, [], None),
                Err(QueryError::Radius { .. })
            ));
        }
        q.radius_m = R;
        for n in [0, MAX_PAGE_SIZE + 1] {
            q.page_size = n;
            assert!(matches!(
                nearby_page(&q, [], None),
                Err(QueryError::PageSize { .. })
            ));
        }
    }

    #[test]
    fn garbage_cursors_are_rejected() {
        let good = Cursor {
            origin: origin(),
            last_distance_m: 12.5,
            last_user: 42,
            seen: Some(vec![1, 42]),
        };
        let token = good.to_token();
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(Cursor::from_token(&token).unwrap(), good);

        let mut bad_tokens: Vec<String> = vec![
            String::new(),
            "!!!!".into(),
            "a".into(),
            "AAAA".into(),
            "x".repeat(MAX_TOKEN_LEN + 1),
            format!("{token}AA"),
            token[..token.len() - 3].to_string(),
        ];
        for (distance, seen) in [
            (f64::NAN, None),
            (-1.0, None),
            (1e9, None),
            (1.0, Some(vec![5, 5])),
            (1.0, Some(vec![9, 3])),
            (1.0, Some((1..=MAX_CURSOR_SEEN as u64 + 1).collect())),
        ] {
            let wire = CursorWire {
                version: CURSOR_VERSION,
                origin: origin(),
                last_distance_m: distance,
                last_user: 1,
                seen,
            };
            bad_tokens.push(base64url_encode(&codec::encode(&wire).unwrap()));
        }
        let wire = CursorWire {
            version: 99,
            origin: origin(),
            last_distance_m: 1.0,
            last_user: 1,
            seen: None,
        };
        bad_tokens.push(base64url_encode(&codec::encode(&wire).unwrap()));
        for t in &bad_tokens {
            assert!(
                matches!(Cursor::from_token(t), Err(QueryError::BadCursor { .. })),
                "accepted {t:?}"
            );
        }
    }

    proptest! {
        /// With no movement, a walk equals filtering and sorting everything.
        #[test]
        fn walk_equals_full_sort(
            ds in proptest::collection::vec(0u32..12_000, 0..120),
            page_size in 1usize..30,
        ) {
            let cands: Vec<_> = ds
                .iter()
                .enumerate()
                .map(|(i, d)| (i as u64 + 1, loc(north(f64::from(*d / 100 * 100)))))
                .collect();
            let q = NearbyQuery { page_size, ..NearbyQuery::new(origin(), R) };
            let pages = walk(&q, &cands);
            for p in &pages[..pages.len() - 1] {
                prop_assert_eq!(p.len(), page_size);
            }
            let mut want: Vec<(f64, u64)> = cands
                .iter()
                .map(|(u, l)| (origin().distance_m(&l.loc), *u))
                .filter(|(d, _)| *d <= R)
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<u64> = want.into_iter().map(|(_, u)| u).collect();
            prop_assert_eq!(pages.concat(), want);
        }

        #[test]
        fn from_token_never_panics(s in "[A-Za-z0-9_-]{0,200}") {
            let _ = Cursor::from_token(&s);
        }
    }
}
