//! How the user-id space is cut into the ranges of shard groups.
//!
//! User ids are `1..u64::MAX` (0 is reserved; `u64::MAX` is the exclusive end of the last range).
//! A fresh cluster cuts that space into equal ranges; later, splits and moves change the table.

use nearby_index::friends::UserRange;
use nearby_raft::GroupId;

/// The first usable user id.
pub const FIRST_USER_ID: u64 = 1;

/// `n` equal ranges covering every user id, numbered as groups `1..=n`.
pub fn initial_ranges(n: u64) -> Vec<(GroupId, UserRange)> {
    let n = n.max(1);
    let span = (u64::MAX - FIRST_USER_ID) / n;
    (0..n)
        .map(|i| {
            let start = FIRST_USER_ID + i * span;
            let end = if i + 1 == n { u64::MAX } else { start + span };
            // start < end always holds: span >= 1 for any n <= u64::MAX - 1.
            let range = UserRange::new(start, end).unwrap_or_else(|_| unreachable!("empty range"));
            (i + 1, range)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_id_space_without_gaps() {
        for n in [1, 2, 4, 7, 64] {
            let r = initial_ranges(n);
            assert_eq!(r.len() as u64, n);
            assert_eq!(r[0].1.start, FIRST_USER_ID);
            assert_eq!(r.last().map(|x| x.1.end), Some(u64::MAX));
            for w in r.windows(2) {
                assert_eq!(w[0].1.end, w[1].1.start);
            }
        }
    }
}
