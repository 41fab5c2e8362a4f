//! H3 cells: which cell a point is in, and which cells a radius around a cell can reach.
//!
//! Owns the project's H3 resolution policy ([`DEFAULT_RESOLUTION`]) and the *cover* of a cell:
//! the smallest grid disk that contains every point within a radius of any point of the cell.
//! "Nearby random users" use cells as channels: a discoverable user publishes to
//! [`CellIndexer::cell_of`] their position and listens to [`CellIndexer::cover`] of that cell,
//! so nobody within the radius is missed, whatever side of a border either user is on. This
//! module never filters by exact distance (a cover over-approximates; the receiver filters with
//! [`crate::geo::LatLng::distance_m`]) and never stores anything.
//!
//! # Why resolution 6 for an 8 km radius
//!
//! A cover is a disk of k rings, 3k(k+1)+1 cells. Measured on 20,000 cells picked at uniformly
//! random points (so weighted by area; `k_distribution` test, reproduced in `docs/index.md`),
//! an 8 km radius needs:
//!
//! | res | avg edge | k (share of cells) | cells per cover (typical / worst) | cover area ÷ circle |
//! |---|---|---|---|---|
//! | 5 | 9.85 km | 1 (96 %), 2 (4 %) | 7 / 19 | ≈ 8.8 |
//! | **6** | 3.73 km | **2 (96 %), 3 (4 %)** | **19 / 37** | **≈ 3.4** |
//! | 7 | 1.41 km | 4 (37 %), 5 (59 %), 6 (4 %) | 91 / 127 | ≈ 2.3 |
//! | 8 | 0.53 km | 10–15 | 469 / 721 | ≈ 1.7 |
//!
//! Resolution 6 is the balance point between three costs:
//!
//! - *Subscriptions per listener*: 19 channels in the common case. Resolution 7 needs ~5×
//!   more (91) to cut the waste below by only a third.
//! - *Over-delivery*: a listener hears everything published in its cover and drops what is
//!   outside its circle; at resolution 6 the cover is ~3.4× the circle's area, at resolution 5
//!   ~8.8× (cells of ≈ 250 km²), which would multiply fan-out traffic.
//! - *Churn*: the mean chord of a hexagon is ≈ 1.36 × its edge, ≈ 5 km at resolution 6, so a
//!   driver (50 km/h, an update every 30 s) changes cell about every 12 updates and a
//!   pedestrian about once an hour; each move swaps 2k + 1 = 5 channels. At resolution 7 a
//!   driver moves every ~4–5 updates and swaps ~11 channels.
//!
//! # How k is derived, per cell
//!
//! H3 cells are not uniform: area varies ~2× over the globe, shapes are distorted away from
//! face centres, cells that cross an icosahedron edge get extra boundary vertices, and twelve
//! cells per resolution are pentagons. So k is computed from the cell's actual geometry rather
//! than from the average edge length:
//!
//! 1. Let `B` be every point within the radius of some point of the cell `C`. `B` is connected
//!    and contains `C`. If `B` reached outside the disk of k rings, a path inside `B` from `C`
//!    would have to step from a disk cell into a cell adjacent to the disk — and those are
//!    exactly the cells at grid distance `k + 1` (the next ring, computed by BFS over
//!    neighbours, so pentagons are handled). Hence: **the disk of k rings covers `B` iff every
//!    cell of ring `k + 1` is farther than the radius from `C`.**
//! 2. Cell boundaries are great-circle arcs (H3 edges are straight in each face's gnomonic
//!    projection; h3o's boundary includes the extra vertices at face crossings), so the distance
//!    between two disjoint cells is the minimum over the vertices of one and the edges of the
//!    other, computed exactly on the unit sphere. A cheap centre-to-centre bound (minus both
//!    circumradii) settles most ring cells without that.
//! 3. k is the first k (from 1) for which step 1 holds, using the radius plus a 1 m margin that
//!    absorbs floating-point differences between h3o's boundaries and its point-in-cell test.
//!
//! k is exact for the cell (minimal up to the 1 m margin); [`CellIndexer::cover`] costs a few
//! dozen boundary computations, so a caller on a hot path should cache covers per cell.

use h3o::{CellIndex, Resolution};

use crate::error::CellError;
use crate::geo::{LatLng, EARTH_RADIUS_M};

/// The resolution the project uses for an 8 km radius; see the module doc for why.
pub const DEFAULT_RESOLUTION: Resolution = Resolution::Six;

/// The widest cover (in rings) [`CellIndexer::cover`] will compute: 7,651 cells. Larger radii
/// at a given resolution are rejected rather than allocating without bound.
pub const MAX_COVER_K: u32 = 50;

/// Safety margin added to every cover radius, in metres.
const MARGIN_M: f64 = 1.0;

/// Maps points to cells and cells to covers at one resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellIndexer {
    resolution: Resolution,
}

impl Default for CellIndexer {
    /// An indexer at [`DEFAULT_RESOLUTION`].
    fn default() -> Self {
        Self::new(DEFAULT_RESOLUTION)
    }
}

impl CellIndexer {
    /// An indexer at `resolution`.
    pub fn new(resolution: Resolution) -> Self {
        Self { resolution }
    }

    /// The resolution of the cells this indexer returns.
    pub fn resolution(&self) -> Resolution {
        self.resolution
    }

    /// The cell containing `p`.
    pub fn cell_of(&self, p: LatLng) -> CellIndex {
        match h3o::LatLng::new(p.lat(), p.lon()) {
            Ok(ll) => ll.to_cell(self.resolution),
            // Unreachable: `LatLng` is always finite, the only thing h3o rejects.
            Err(_) => CellIndex::first(self.resolution),
        }
    }

    /// The smallest k such that the grid disk of k rings around `cell` contains every point
    /// within `radius_m` of any point of `cell` (see the module doc for the derivation).
    /// Always at least 1: a point on the border may belong to a neighbour.
    ///
    /// # Errors
    /// [`CellError::Radius`] for a NaN, infinite or negative radius; [`CellError::TooWide`] if
    /// k would exceed [`MAX_COVER_K`].
    pub fn k_for_radius(&self, cell: CellIndex, radius_m: f64) -> Result<u32, CellError> {
        if !(radius_m >= 0.0 && radius_m.is_finite()) {
            return Err(CellError::Radius { radius_m });
        }
        let reach = (radius_m + MARGIN_M) / EARTH_RADIUS_M;
        let too_wide = CellError::TooWide {
            radius_m,
            resolution: u8::from(cell.resolution()),
            max_k: MAX_COVER_K,
        };
        // Quick reject, so a huge radius fails before walking 50 rings: ring k + 1 is roughly
        // 1.5 (k - 1) local edge lengths away and local edges are within ~2x of the average, so
        // a radius above (MAX_COVER_K + 2) x 4 average edges always needs more than MAX_COVER_K.
        let edge_m = cell.resolution().edge_length_m();
        if radius_m > f64::from(MAX_COVER_K + 2) * 4.0 * edge_m {
            return Err(too_wide);
        }
        let home = Poly::of(cell);
        // k = 0 never suffices: the six neighbours touch the cell.
        for k in 1..=MAX_COVER_K {
            let ring = k + 1;
            let clear = cell
                .grid_disk_distances::<Vec<_>>(ring)
                .into_iter()
                .filter(|&(_, d)| d == ring)
                .all(|(other, _)| home.farther_than(&Poly::of(other), reach));
            if clear {
                return Ok(k);
            }
        }
        Err(too_wide)
    }

    /// `cell` and every cell within [`k_for_radius`](Self::k_for_radius) rings of it: all cells
    /// that a point within `radius_m` of any point of `cell` can be in.
    ///
    /// # Errors
    /// As [`k_for_radius`](Self::k_for_radius).
    pub fn cover(&self, cell: CellIndex, radius_m: f64) -> Result<Vec<CellIndex>, CellError> {
        let k = self.k_for_radius(cell, radius_m)?;
        Ok(cell.grid_disk(k))
    }
}

type V3 = [f64; 3];

fn unit(ll: h3o::LatLng) -> V3 {
    let (lat, lng) = (ll.lat_radians(), ll.lng_radians());
    [lat.cos() * lng.cos(), lat.cos() * lng.sin(), lat.sin()]
}

fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: V3, b: V3) -> V3 {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

/// Angle between two unit vectors, stable for tiny and large angles.
fn angle(a: V3, b: V3) -> f64 {
    norm(cross(a, b)).atan2(dot(a, b))
}

/// Angular distance from `p` to the great-circle arc `a`–`b` (shorter than π).
fn point_arc(p: V3, a: V3, b: V3) -> f64 {
    let n = cross(a, b);
    let len = norm(n);
    if len < 1e-15 {
        return angle(p, a);
    }
    let n = [n[0] / len, n[1] / len, n[2] / len];
    let s = dot(p, n);
    let foot = [p[0] - s * n[0], p[1] - s * n[1], p[2] - s * n[2]];
    // The foot of the perpendicular lies on the arc iff it is "after" a and "before" b.
    if dot(cross(a, foot), n) >= 0.0 && dot(cross(foot, b), n) >= 0.0 {
        s.abs().min(1.0).asin()
    } else {
        angle(p, a).min(angle(p, b))
    }
}

/// A cell as a spherical polygon: centre, vertices (unit vectors) and circumradius (radians).
struct Poly {
    centre: V3,
    verts: Vec<V3>,
    radius: f64,
}

impl Poly {
    fn of(cell: CellIndex) -> Self {
        let centre = unit(h3o::LatLng::from(cell));
        let verts: Vec<V3> = cell.boundary().iter().map(|v| unit(*v)).collect();
        let radius = verts.iter().map(|v| angle(centre, *v)).fold(0.0, f64::max);
        Self {
            centre,
            verts,
            radius,
        }
    }

    /// Min over this polygon's vertices of the distance to `other`'s edges.
    fn vertex_to_edges(&self, other: &Poly) -> f64 {
        let n = other.verts.len();
        let mut best = f64::INFINITY;
        for &p in &self.verts {
            for i in 0..n {
                best = best.min(point_arc(p, other.verts[i], other.verts[(i + 1) % n]));
            }
        }
        best
    }

    /// True if every point of `self` is more than `reach` radians from every point of `other`
    /// (the polygons are assumed not to overlap, as distinct H3 cells do not).
    fn farther_than(&self, other: &Poly, reach: f64) -> bool {
        if angle(self.centre, other.centre) - self.radius - other.radius > reach {
            return true;
        }
        self.vertex_to_edges(other).min(other.vertex_to_edges(self)) > reach
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, HashSet};

    const R8: f64 = 8_000.0;

    /// A uniformly random point on the sphere.
    fn random_point(rng: &mut StdRng) -> LatLng {
        let lat = (2.0 * rng.random::<f64>() - 1.0).asin().to_degrees();
        let lon = rng.random_range(-180.0..180.0);
        LatLng::new(lat, lon).unwrap()
    }

    /// The point `d` metres from `p` on initial bearing `bearing` (radians).
    fn destination(p: LatLng, bearing: f64, d: f64) -> LatLng {
        let delta = d / EARTH_RADIUS_M;
        let (phi1, l1) = (p.lat().to_radians(), p.lon().to_radians());
        let phi2 = (phi1.sin() * delta.cos() + phi1.cos() * delta.sin() * bearing.cos())
            .clamp(-1.0, 1.0)
            .asin();
        let l2 = l1 + (bearing.sin() * delta.sin() * phi1.cos()).atan2(delta.cos() - phi1.sin() * phi2.sin());
        let lon = (l2.to_degrees() + 540.0).rem_euclid(360.0) - 180.0;
        LatLng::new(phi2.to_degrees().clamp(-90.0, 90.0), lon).unwrap()
    }

    fn check_covered(ix: &CellIndexer, p: LatLng, q: LatLng, r: f64) {
        let c = ix.cell_of(p);
        let cover = ix.cover(c, r).unwrap();
        assert!(
            cover.contains(&ix.cell_of(q)),
            "{q} ({} m from {p}) is not in the cover of {c} (k = {})",
            p.distance_m(&q),
            ix.k_for_radius(c, r).unwrap()
        );
    }

    #[test]
    fn cover_contains_every_point_within_radius() {
        let ix = CellIndexer::default();
        let mut rng = StdRng::seed_from_u64(0x6e6561726279);
        for _ in 0..1_500 {
            let p = random_point(&mut rng);
            for _ in 0..4 {
                // Bias towards the rim, where a miss would show.
                let d = R8 * (1.0 - rng.random::<f64>().powi(3));
                let q = destination(p, rng.random_range(0.0..std::f64::consts::TAU), d);
                check_covered(&ix, p, q, R8);
            }
        }
    }

    #[test]
    fn cover_holds_at_pentagons_poles_and_antimeridian() {
        let ix = CellIndexer::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut origins: Vec<LatLng> = DEFAULT_RESOLUTION
            .pentagons()
            .map(|c| {
                let ll = h3o::LatLng::from(c);
                LatLng::new(ll.lat(), ll.lng()).unwrap()
            })
            .collect();
        origins.extend(
            [
                (90.0, 0.0),
                (-90.0, 0.0),
                (89.95, 45.0),
                (0.0, 180.0),
                (10.0, -179.99),
            ]
            .map(|(a, b)| LatLng::new(a, b).unwrap()),
        );
        for o in origins {
            for _ in 0..150 {
                let p = destination(o, rng.random_range(0.0..6.3), rng.random_range(0.0..6_000.0));
                let q = destination(p, rng.random_range(0.0..6.3), R8 * rng.random::<f64>());
                check_covered(&ix, p, q, R8);
            }
        }
    }

    #[test]
    fn cover_holds_at_other_resolutions_and_radii() {
        let mut rng = StdRng::seed_from_u64(99);
        for (res, r) in [
            (Resolution::Five, R8),
            (Resolution::Seven, R8),
            (Resolution::Six, 500.0),
            (Resolution::Eight, 2_000.0),
        ] {
            let ix = CellIndexer::new(res);
            for _ in 0..300 {
                let p = random_point(&mut rng);
                let q = destination(p, rng.random_range(0.0..6.3), r * rng.random::<f64>());
                check_covered(&ix, p, q, r);
            }
        }
    }

    /// k is minimal: for most cells a point within the radius of the cell lands in ring k, so
    /// a disk of k - 1 rings would miss it. Witnesses are searched from points just inside the
    /// cell's vertices towards the vertices of ring-k cells.
    #[test]
    fn k_is_minimal_on_most_cells() {
        let ix = CellIndexer::default();
        let mut rng = StdRng::seed_from_u64(3);
        let (mut cells, mut witnessed) = (0, 0);
        for _ in 0..60 {
            let c = ix.cell_of(random_point(&mut rng));
            let k = ix.k_for_radius(c, R8).unwrap();
            let inner: HashSet<CellIndex> = c.grid_disk::<Vec<_>>(k - 1).into_iter().collect();
            let centre = h3o::LatLng::from(c);
            let starts: Vec<h3o::LatLng> = c
                .boundary()
                .iter()
                .map(|v| {
                    // 0.5 % of the way from the vertex to the centre: inside the cell.
                    let f = 0.005;
                    h3o::LatLng::new(
                        v.lat() + f * (centre.lat() - v.lat()),
                        v.lng() + f * (centre.lng() - v.lng()),
                    )
                    .unwrap()
                })
                .filter(|p| p.to_cell(DEFAULT_RESOLUTION) == c)
                .collect();
            let targets: Vec<h3o::LatLng> = c
                .grid_disk_distances::<Vec<_>>(k)
                .into_iter()
                .filter(|&(_, d)| d == k)
                .flat_map(|(o, _)| o.boundary().iter().copied().collect::<Vec<_>>())
                .collect();
            let found = starts.iter().any(|s| {
                let p = LatLng::new(s.lat(), s.lng()).unwrap();
                targets.iter().any(|t| {
                    let t = LatLng::new(t.lat(), t.lng()).unwrap();
                    let (y, x) = bearing_parts(p, t);
                    let q = destination(p, y.atan2(x), R8 * 0.999);
                    !inner.contains(&ix.cell_of(q))
                })
            });
            cells += 1;
            witnessed += usize::from(found);
        }
        assert!(
            witnessed * 10 >= cells * 9,
            "{witnessed}/{cells} cells had a witness"
        );
    }

    fn bearing_parts(p: LatLng, t: LatLng) -> (f64, f64) {
        let (p1, p2) = (p.lat().to_radians(), t.lat().to_radians());
        let dl = (t.lon() - p.lon()).to_radians();
        (
            dl.sin() * p2.cos(),
            p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos(),
        )
    }

    #[test]
    fn rejects_bad_radii() {
        let ix = CellIndexer::default();
        let c = ix.cell_of(LatLng::new(0.0, 0.0).unwrap());
        for r in [f64::NAN, -1.0, f64::INFINITY] {
            assert!(matches!(ix.cover(c, r), Err(CellError::Radius { .. })));
        }
        assert!(matches!(ix.cover(c, 5_000_000.0), Err(CellError::TooWide { .. })));
        assert_eq!(ix.k_for_radius(c, 0.0).unwrap(), 1);
        assert_eq!(ix.cover(c, 0.0).unwrap().len(), 7);
    }

    fn k_histogram(res: Resolution, r: f64, n: usize) -> BTreeMap<u32, usize> {
        let ix = CellIndexer::new(res);
        let mut rng = StdRng::seed_from_u64(11);
        let mut h = BTreeMap::new();
        for _ in 0..n {
            let k = ix.k_for_radius(ix.cell_of(random_point(&mut rng)), r).unwrap();
            *h.entry(k).or_insert(0) += 1;
        }
        h
    }

    #[test]
    fn k_at_default_resolution_is_small() {
        let h = k_histogram(DEFAULT_RESOLUTION, R8, 300);
        assert!(h.keys().all(|k| (2..=4).contains(k)), "{h:?}");
    }

    /// The distribution reported in docs/index.md:
    /// `cargo test -p nearby-index --release -j2 -- --ignored --nocapture k_distribution`
    #[test]
    #[ignore = "prints statistics for the docs"]
    #[allow(clippy::print_stderr)]
    fn k_distribution() {
        for res in [
            Resolution::Five,
            Resolution::Six,
            Resolution::Seven,
            Resolution::Eight,
        ] {
            let n = 20_000;
            let h = k_histogram(res, R8, n);
            eprintln!("res {res}: 8 km, {n} random cells, k -> count: {h:?}");
        }
    }
}
