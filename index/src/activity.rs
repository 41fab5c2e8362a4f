//! Where users are, coarsely: counts of located users by H3 cell at a coarse resolution, for
//! an operator's picture of activity (the admin console's map).
//!
//! Owns [`CellCounts`], kept up to date as locations are set, moved and expired (the
//! [`crate::ttl::LocationTable`] that holds the locations maintains it when asked to, so no
//! change of a location can be missed), at the cost of one or two point-to-cell conversions per
//! update — never a scan of the table. It holds **counts only**: never a user id, never a
//! position finer than a cell of [`ACTIVITY_RESOLUTION`] (≈ 12,000 km², about the size of a
//! region around a large city). Like the rest of the crate it reads no clock and does no I/O.

use std::collections::HashMap;

use h3o::{CellIndex, Resolution};

use crate::geo::LatLng;

/// The resolution of the activity map: resolution 3, cells of ≈ 12,400 km² (≈ 69 km edges).
/// Coarse on purpose: a count there says which region is busy, never where anyone is.
pub const ACTIVITY_RESOLUTION: Resolution = Resolution::Three;

/// Located users by coarse cell (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellCounts {
    resolution: Resolution,
    /// Cell index → users located in it; never holds a zero.
    counts: HashMap<u64, u32>,
}

impl Default for CellCounts {
    /// Counts at [`ACTIVITY_RESOLUTION`].
    fn default() -> Self {
        Self::new(ACTIVITY_RESOLUTION)
    }
}

impl CellCounts {
    /// No users yet, counted by cells of `resolution`.
    pub fn new(resolution: Resolution) -> Self {
        Self {
            resolution,
            counts: HashMap::new(),
        }
    }

    /// The resolution cells are counted at.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// The cell of `p` at this resolution, as its 64-bit H3 index.
    pub fn cell_of(&self, p: LatLng) -> u64 {
        match h3o::LatLng::new(p.lat(), p.lon()) {
            Ok(ll) => u64::from(ll.to_cell(self.resolution)),
            // Unreachable: a `LatLng` is always finite, the only thing h3o rejects.
            Err(_) => u64::from(CellIndex::first(self.resolution)),
        }
    }

    /// A user is now located at `p`.
    pub fn add(&mut self, p: LatLng) {
        *self.counts.entry(self.cell_of(p)).or_insert(0) += 1;
    }

    /// A user located at `p` is no longer located.
    pub fn remove(&mut self, p: LatLng) {
        let cell = self.cell_of(p);
        if let Some(n) = self.counts.get_mut(&cell) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&cell);
            }
        }
    }

    /// A user moved from `from` to `to`.
    pub fn moved(&mut self, from: LatLng, to: LatLng) {
        let (a, b) = (self.cell_of(from), self.cell_of(to));
        if a != b {
            self.remove(from);
            *self.counts.entry(b).or_insert(0) += 1;
        }
    }

    /// Cells with at least one user.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True if no user is counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Users counted in all cells.
    pub fn total(&self) -> u64 {
        self.counts.values().map(|&n| u64::from(n)).sum()
    }

    /// At most `max` cells, the busiest first (ties by cell index, so the answer is stable).
    pub fn busiest(&self, max: usize) -> Vec<(u64, u32)> {
        let mut all: Vec<(u64, u32)> = self.counts.iter().map(|(&c, &n)| (c, n)).collect();
        busiest(&mut all, max);
        all
    }
}

/// Sorts `cells` busiest first (ties by cell index) and keeps at most `max` of them: how a
/// merge of several [`CellCounts::busiest`] lists is cut again.
pub fn busiest(cells: &mut Vec<(u64, u32)>, max: usize) {
    cells.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    cells.truncate(max);
}

/// The centre of the H3 cell with index `cell`, or `None` if `cell` is not a valid index.
pub fn cell_centre(cell: u64) -> Option<LatLng> {
    let cell = CellIndex::try_from(cell).ok()?;
    let ll = h3o::LatLng::from(cell);
    LatLng::new(ll.lat(), ll.lng()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(lat: f64, lon: f64) -> LatLng {
        LatLng::new(lat, lon).expect("valid")
    }

    #[test]
    fn counts_follow_adds_moves_and_removes() {
        let mut c = CellCounts::default();
        let (berlin, cape_town, tokyo) = (p(52.52, 13.405), p(-33.92, 18.42), p(35.68, 139.69));
        c.add(berlin);
        c.add(berlin);
        c.add(tokyo);
        assert_eq!((c.len(), c.total()), (2, 3));
        // A move inside the cell changes nothing; one across cells moves the count.
        c.moved(berlin, p(52.53, 13.41));
        assert_eq!(c.busiest(10)[0], (c.cell_of(berlin), 2));
        c.moved(tokyo, berlin);
        assert_eq!(c.busiest(10), vec![(c.cell_of(berlin), 3)]);
        c.remove(cape_town); // nobody counted there: nothing changes
        assert_eq!(c.total(), 3);
        c.remove(berlin);
        c.remove(berlin);
        c.remove(berlin);
        assert!(c.is_empty());
    }

    #[test]
    fn the_busiest_come_first_and_are_capped() {
        let mut c = CellCounts::default();
        for (i, lon) in [0.0, 10.0, 20.0, 30.0].into_iter().enumerate() {
            for _ in 0..=i {
                c.add(p(0.0, lon));
            }
        }
        let top = c.busiest(2);
        assert_eq!(top.iter().map(|t| t.1).collect::<Vec<_>>(), vec![4, 3]);
        assert_eq!(top[0].0, c.cell_of(p(0.0, 30.0)));
    }

    #[test]
    fn a_cell_centre_lies_in_the_cell_and_bad_indexes_have_none() {
        let c = CellCounts::default();
        let cell = c.cell_of(p(48.8566, 2.3522));
        let centre = cell_centre(cell).expect("a valid cell");
        assert_eq!(c.cell_of(centre), cell);
        assert!(centre.distance_m(&p(48.8566, 2.3522)) < 100_000.0);
        assert_eq!(cell_centre(0), None);
        assert_eq!(cell_centre(u64::MAX), None);
    }
}
