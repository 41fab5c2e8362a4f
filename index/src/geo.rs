//! Points on Earth, user ids and time as the index sees them.
//!
//! Owns [`LatLng`] (a validated WGS-84 coordinate in degrees), great-circle distance,
//! [`UserId`] and [`Millis`]. Every coordinate that enters the index goes through
//! [`LatLng::new`] or its validating `Deserialize`, so the rest of the crate never sees NaN,
//! infinities or out-of-range values. This module never reads a clock: time is always a
//! [`Millis`] handed in by the caller.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::GeoError;

/// A user's id. Id 0 is reserved and never names a user; see [`check_user_id`].
pub type UserId = u64;

/// Mean Earth radius (IUGG R1), in metres, used for every distance in the project.
pub const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Rejects the reserved user id 0.
///
/// # Errors
/// [`GeoError::ReservedUserId`] for `id == 0`.
pub fn check_user_id(id: u64) -> Result<UserId, GeoError> {
    if id == 0 {
        Err(GeoError::ReservedUserId { id })
    } else {
        Ok(id)
    }
}

/// A validated coordinate: latitude in `[-90, 90]`, longitude in `[-180, 180]`, both finite.
///
/// Deserialisation validates too, so a `LatLng` decoded from the wire is as trustworthy as one
/// built with [`LatLng::new`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLatLng", into = "RawLatLng")]
pub struct LatLng {
    lat: f64,
    lon: f64,
}

/// The unvalidated wire form of [`LatLng`].
#[derive(Serialize, Deserialize)]
struct RawLatLng {
    lat: f64,
    lon: f64,
}

impl TryFrom<RawLatLng> for LatLng {
    type Error = GeoError;
    fn try_from(raw: RawLatLng) -> Result<Self, GeoError> {
        LatLng::new(raw.lat, raw.lon)
    }
}

impl From<LatLng> for RawLatLng {
    fn from(p: LatLng) -> Self {
        RawLatLng {
            lat: p.lat,
            lon: p.lon,
        }
    }
}

impl LatLng {
    /// Builds a coordinate from degrees.
    ///
    /// # Errors
    /// [`GeoError::Latitude`] / [`GeoError::Longitude`] for NaN, ±∞, `|lat| > 90` or
    /// `|lon| > 180`.
    pub fn new(lat: f64, lon: f64) -> Result<Self, GeoError> {
        // `contains` is false for NaN, so this also rejects NaN and the infinities.
        if !(-90.0..=90.0).contains(&lat) {
            return Err(GeoError::Latitude { lat });
        }
        if !(-180.0..=180.0).contains(&lon) {
            return Err(GeoError::Longitude { lon });
        }
        Ok(Self { lat, lon })
    }

    /// Latitude in degrees.
    pub fn lat(&self) -> f64 {
        self.lat
    }

    /// Longitude in degrees.
    pub fn lon(&self) -> f64 {
        self.lon
    }

    /// Great-circle distance to `other` in metres (haversine on a sphere of radius
    /// [`EARTH_RADIUS_M`]; within about 0.5 % of the ellipsoidal distance).
    pub fn distance_m(&self, other: &LatLng) -> f64 {
        self.central_angle(other) * EARTH_RADIUS_M
    }

    /// Central angle to `other`, in radians.
    pub(crate) fn central_angle(&self, other: &LatLng) -> f64 {
        let (p1, p2) = (self.lat.to_radians(), other.lat.to_radians());
        let dp = p2 - p1;
        let dl = (other.lon - self.lon).to_radians();
        let a = (dp * 0.5).sin().powi(2) + p1.cos() * p2.cos() * (dl * 0.5).sin().powi(2);
        // Rounding can push `a` a hair above 1 for antipodal points.
        2.0 * a.sqrt().min(1.0).asin()
    }
}

impl fmt::Display for LatLng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.lat, self.lon)
    }
}

/// A point in time: milliseconds since the Unix epoch. The index never reads a clock; callers
/// pass `Millis` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Millis(pub u64);

impl Millis {
    /// The epoch itself.
    pub const ZERO: Millis = Millis(0);

    /// Milliseconds since the epoch.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at `u64::MAX` ms.
    pub fn saturating_add(self, d: Duration) -> Millis {
        Millis(self.0.saturating_add(duration_ms(d)))
    }

    /// `self - d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Millis {
        Millis(self.0.saturating_sub(duration_ms(d)))
    }

    /// Time from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Millis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// Whole milliseconds in `d`, saturating at `u64::MAX`.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_coordinates() {
        for (lat, lon) in [
            (f64::NAN, 0.0),
            (0.0, f64::NAN),
            (f64::INFINITY, 0.0),
            (0.0, f64::NEG_INFINITY),
            (90.000001, 0.0),
            (-90.5, 0.0),
            (0.0, 180.0001),
            (0.0, -181.0),
        ] {
            assert!(LatLng::new(lat, lon).is_err(), "({lat}, {lon}) accepted");
        }
        for (lat, lon) in [(90.0, 180.0), (-90.0, -180.0), (0.0, 0.0), (-0.0, -0.0)] {
            assert!(LatLng::new(lat, lon).is_ok(), "({lat}, {lon}) rejected");
        }
    }

    #[test]
    fn error_messages_name_the_input() {
        let e = LatLng::new(91.5, 0.0).unwrap_err();
        assert_eq!(e.to_string(), "latitude 91.5 is out of range [-90, 90]");
        let e = LatLng::new(0.0, -200.0).unwrap_err();
        assert_eq!(e.to_string(), "longitude -200 is out of range [-180, 180]");
        assert_eq!(check_user_id(0).unwrap_err(), GeoError::ReservedUserId { id: 0 });
        assert_eq!(check_user_id(7), Ok(7));
    }

    #[test]
    fn serde_round_trip_and_rejection() {
        let p = LatLng::new(52.52, 13.405).unwrap();
        let bytes = crate::codec::encode(&p).unwrap();
        assert_eq!(crate::codec::decode::<LatLng>(&bytes).unwrap(), p);

        #[derive(Serialize)]
        struct Fake {
            lat: f64,
            lon: f64,
        }
        for (lat, lon) in [(91.0, 0.0), (0.0, 181.0), (f64::NAN, 0.0), (0.0, f64::INFINITY)] {
            let bytes = crate::codec::encode(&Fake { lat, lon }).unwrap();
            let err = crate::codec::decode::<LatLng>(&bytes).unwrap_err();
            assert!(
                matches!(err, crate::error::CodecError::Decode { .. }),
                "({lat}, {lon}): {err:?}"
            );
        }
    }

    #[test]
    fn distance_edge_cases() {
        let a = LatLng::new(10.0, 20.0).unwrap();
        assert_eq!(a.distance_m(&a), 0.0);
        let n = LatLng::new(90.0, 0.0).unwrap();
        let s = LatLng::new(-90.0, 0.0).unwrap();
        let half = std::f64::consts::PI * EARTH_RADIUS_M;
        assert!((n.distance_m(&s) - half).abs() < 1e-6);
        // Across the antimeridian.
        let w = LatLng::new(0.0, 179.9).unwrap();
        let e = LatLng::new(0.0, -179.9).unwrap();
        assert!((w.distance_m(&e) - 0.2f64.to_radians() * EARTH_RADIUS_M).abs() < 1e-3);
        // Antipodes: haversine loses precision there (asin near 1), to well under a metre.
        let p = LatLng::new(40.0, -3.0).unwrap();
        let q = LatLng::new(-40.0, 177.0).unwrap();
        assert!((p.distance_m(&q) - half).abs() < 1.0);
    }

    /// Table test in the style of raft-rs `testdata/`: see the file's header for the format.
    #[test]
    fn city_pairs_table() {
        let table = include_str!("../testdata/city_pairs.txt");
        let mut cases = 0;
        for (n, line) in table.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 7, "line {}: want 7 fields: {line}", n + 1);
            let num = |i: usize| -> f64 { f[i].parse().unwrap() };
            let a = LatLng::new(num(1), num(2)).unwrap();
            let b = LatLng::new(num(4), num(5)).unwrap();
            let want_m = num(6) * 1000.0;
            let got_m = a.distance_m(&b);
            let rel = (got_m - want_m).abs() / want_m;
            assert!(
                rel <= 0.005,
                "line {}: {} -> {}: got {got_m:.0} m, want {want_m:.0} m ({:.3} %)",
                n + 1,
                f[0],
                f[3],
                rel * 100.0
            );
            // Symmetric.
            assert!((b.distance_m(&a) - got_m).abs() < 1e-6);
            cases += 1;
        }
        assert!(cases >= 8, "only {cases} cases in the table");
    }

    #[test]
    fn millis_helpers() {
        let t = Millis(1_000);
        assert_eq!(t.saturating_add(Duration::from_secs(2)), Millis(3_000));
        assert_eq!(
            Millis(u64::MAX - 1).saturating_add(Duration::MAX),
            Millis(u64::MAX)
        );
        assert_eq!(t.saturating_sub(Duration::from_secs(5)), Millis(0));
        assert_eq!(Millis(5_000).saturating_duration_since(t), Duration::from_secs(4));
        assert_eq!(t.saturating_duration_since(Millis(5_000)), Duration::ZERO);
    }
}
