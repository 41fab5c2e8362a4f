//! Sorted sets of 64-bit ids in Elias–Fano coding: the compact storage behind
//! [`super::FriendSet`].
//!
//! `n` ids spanning `u` (largest minus smallest) take `n · (2 + ⌊log₂(u/n)⌋)` bits and two header
//! words. For a few hundred ids spread over the whole 64-bit space, as friends in other shard
//! groups are, that is ~59 bits an id with the directory below, instead of 64; ids bunched in one group's range take
//! fewer. Each id, less the smallest, is cut into its last `l` bits (the *low* part, stored
//! packed, `l` bits each) and the rest (the *high* part, stored in unary: id `i` sets bit
//! `high_i + i` of the *upper* bit vector, so the upper vector holds `n` ones and one zero per
//! high value passed).
//!
//! `contains` finds the bucket of the wanted high part — the place after the upper vector's
//! `high`-th zero — in a directory of the zeros before each upper word (16 bits a word, ~0.5–0.9
//! bit an id): guessed from the zeros' density, then a step or two. It selects the zero inside
//! its word with broadword arithmetic and compares the one or two lows in the bucket: no
//! allocation, no pass over the set. A set of more than [`MAX_CODED`] ids is kept as a plain
//! sorted array, searched by bisection.
//!
//! The words (an empty set has none and allocates nothing):
//! - `[0]`: the header: `l` in the top 8 bits (`PLAIN` for a plain array, whose ids follow from
//!   `[1]`), then, from the bottom, 16 bits each: the number of ids, of upper words and of zeros
//!   in them;
//! - `[1]`: the smallest id;
//! - `[2 .. 2 + upper]`: the upper bit vector, `⌈(n + (u >> l) + 1) / 64⌉` words;
//! - then `⌈n · l / 64⌉` words of packed low parts;
//! - then the directory, `⌈upper / 4⌉` words: entry `w`, 16 bits at `w % 4` of word `w / 4`,
//!   counts the zeros of the upper words before word `w`.
//!
//! The coding is a function of the set alone, so equal sets have equal words (`Eq` and `Hash`
//! compare the words).

/// Sets of more ids than this are kept as plain sorted arrays (8 bytes an id): the directory's
/// 16-bit entries count at most `2n + 1` zeros.
pub(crate) const MAX_CODED: usize = 4096;

/// The top byte of the header of a plain array.
const PLAIN: u64 = 0xFF;

/// An immutable sorted set of `u64`, Elias–Fano coded (see the module's comment).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Packed(Option<Box<[u64]>>);

/// The parts of a [`Packed`] set, as read from its header.
enum View<'a> {
    Empty,
    Plain(&'a [u64]),
    Coded(Coded<'a>),
}

#[derive(Clone, Copy)]
pub(crate) struct Coded<'a> {
    n: usize,
    l: u32,
    min: u64,
    upper: &'a [u64],
    lows: &'a [u64],
    /// Zeros before each upper word, 16 bits an entry.
    dir: &'a [u64],
    /// Zeros in the upper words.
    zeros: u64,
}

impl Packed {
    /// The empty set.
    pub(crate) const EMPTY: Packed = Packed(None);

    /// Codes `ids`, which must be ascending and unique.
    pub(crate) fn from_sorted(ids: &[u64]) -> Self {
        debug_assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids must be ascending and unique"
        );
        let n = ids.len();
        let (Some(&min), Some(&max)) = (ids.first(), ids.last()) else {
            return Self::default();
        };
        if n > MAX_CODED {
            let mut words = Vec::with_capacity(n + 1);
            words.push(n as u64 | PLAIN << 56);
            words.extend_from_slice(ids);
            return Self(Some(words.into_boxed_slice()));
        }
        let span = max - min;
        let l = low_bits(span, n);
        let upper_words = upper_words(span, n, l);
        let low_words = low_words(n, l);
        let mut words = vec![0u64; 2 + upper_words + low_words + upper_words.div_ceil(4)];
        words[1] = min;
        let (upper, rest) = words[2..].split_at_mut(upper_words);
        let (lows, dir) = rest.split_at_mut(low_words);
        for (i, &id) in ids.iter().enumerate() {
            let v = id - min;
            let at = (v >> l) + i as u64;
            upper[(at / 64) as usize] |= 1 << (at % 64);
            if l > 0 {
                write_low(lows, i, l, v & mask(l));
            }
        }
        let mut zeros = 0u64;
        for (w, word) in upper.iter().enumerate() {
            // At most 2n + 1 <= 8,193 zeros come before the last word: 16 bits hold them.
            dir[w / 4] |= zeros << (16 * (w % 4));
            zeros += u64::from(word.count_zeros());
        }
        words[0] = n as u64 | (upper_words as u64) << 16 | zeros << 32 | u64::from(l) << 56;
        Self(Some(words.into_boxed_slice()))
    }

    /// Number of ids.
    pub(crate) fn len(&self) -> usize {
        match self.view() {
            View::Empty => 0,
            View::Plain(ids) => ids.len(),
            View::Coded(c) => c.n,
        }
    }

    /// True if `id` is in the set.
    pub(crate) fn contains(&self, id: u64) -> bool {
        match self.view() {
            View::Empty => false,
            View::Plain(ids) => ids.binary_search(&id).is_ok(),
            View::Coded(c) => c.contains(id),
        }
    }

    /// The ids in ascending order.
    pub(crate) fn iter(&self) -> Iter<'_> {
        match self.view() {
            View::Empty => Iter::Plain([].iter()),
            View::Plain(ids) => Iter::Plain(ids.iter()),
            View::Coded(c) => Iter::Coded {
                word: 0,
                bits: c.upper.first().copied().unwrap_or(0),
                i: 0,
                c,
            },
        }
    }

    /// Bytes held on the heap: what the set costs beyond its 16-byte handle.
    #[cfg(test)]
    pub(crate) fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(self.words())
    }

    fn words(&self) -> &[u64] {
        self.0.as_deref().unwrap_or_default()
    }

    fn view(&self) -> View<'_> {
        let Some((&header, rest)) = self.words().split_first() else {
            return View::Empty;
        };
        let l = (header >> 56) as u32;
        if u64::from(l) == PLAIN {
            return View::Plain(rest);
        }
        let n = (header & 0xFFFF) as usize;
        let upper_words = ((header >> 16) & 0xFFFF) as usize;
        let zeros = (header >> 32) & 0xFFFF;
        let (min, rest) = rest.split_first().map_or((0, rest), |(m, r)| (*m, r));
        let (upper, rest) = rest.split_at(upper_words);
        let (lows, dir) = rest.split_at(low_words(n, l));
        View::Coded(Coded {
            n,
            l,
            min,
            upper,
            lows,
            dir,
            zeros,
        })
    }
}

impl Coded<'_> {
    fn contains(&self, id: u64) -> bool {
        let Some(v) = id.checked_sub(self.min) else {
            return false;
        };
        let high = v >> self.l;
        if high >= self.upper.len() as u64 * 64 {
            return false;
        }
        // The bucket of `high` starts right after the upper vector's `high`-th zero, which is
        // in the last word with fewer zeros before it than `high`: guessed from the zeros'
        // density, then found by a step or two through the directory.
        let mut at = 0;
        if high > 0 {
            if high > self.zeros {
                return false;
            }
            let last = self.upper.len() - 1;
            let mut w = ((high * self.upper.len() as u64) / (self.zeros + 1)) as usize;
            w = w.min(last);
            while w > 0 && self.zeros_before(w) >= high {
                w -= 1;
            }
            while w < last && self.zeros_before(w + 1) < high {
                w += 1;
            }
            // The word holds the zero: the next word has `high` zeros before it, or this is the
            // last word and `high` is at most all the zeros.
            let k = high - self.zeros_before(w) - 1;
            at = w as u64 * 64 + select(!self.upper[w], k) + 1;
        }
        // Ones before `at` are the ids below the bucket: `at` minus the `high` zeros.
        let mut i = (at - high) as usize;
        let low = v & mask(self.l);
        while i < self.n && self.bit(at) {
            let here = self.low(i);
            if here >= low {
                return here == low;
            }
            i += 1;
            at += 1;
        }
        false
    }

    fn zeros_before(&self, w: usize) -> u64 {
        (self.dir[w / 4] >> (16 * (w % 4))) & 0xFFFF
    }

    fn bit(&self, at: u64) -> bool {
        self.upper
            .get((at / 64) as usize)
            .is_some_and(|w| w >> (at % 64) & 1 == 1)
    }

    fn low(&self, i: usize) -> u64 {
        if self.l == 0 {
            return 0;
        }
        let bit = i as u64 * u64::from(self.l);
        let (w, s) = ((bit / 64) as usize, (bit % 64) as u32);
        let mut v = self.lows[w] >> s;
        if s + self.l > 64 {
            v |= self.lows[w + 1] << (64 - s);
        }
        v & mask(self.l)
    }
}

/// The ids of a [`Packed`] set in ascending order.
pub(crate) enum Iter<'a> {
    Plain(std::slice::Iter<'a, u64>),
    Coded {
        c: Coded<'a>,
        /// The upper word being read, and its ones not yet read.
        word: usize,
        bits: u64,
        /// The index of the next id.
        i: usize,
    },
}

impl Iterator for Iter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match self {
            Iter::Plain(ids) => ids.next().copied(),
            Iter::Coded { c, word, bits, i } => {
                if *i >= c.n {
                    return None;
                }
                while *bits == 0 {
                    *word += 1;
                    *bits = *c.upper.get(*word)?;
                }
                let at = *word as u64 * 64 + u64::from(bits.trailing_zeros());
                *bits &= *bits - 1;
                let high = at - *i as u64;
                let id = c.min + (high << c.l | c.low(*i));
                *i += 1;
                Some(id)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = match self {
            Iter::Plain(ids) => ids.len(),
            Iter::Coded { c, i, .. } => c.n - *i,
        };
        (left, Some(left))
    }
}

impl ExactSizeIterator for Iter<'_> {}

/// `⌊log₂(span / n)⌋`, or 0 when the ids are denser than one per value.
fn low_bits(span: u64, n: usize) -> u32 {
    match span / n as u64 {
        0 => 0,
        q => 63 - q.leading_zeros(),
    }
}

fn upper_words(span: u64, n: usize, l: u32) -> usize {
    // n ones and (span >> l) + 1 zeros at most: u128, since span may be near 2^64.
    let bits = n as u128 + u128::from(span >> l) + 1;
    bits.div_ceil(64) as usize
}

fn low_words(n: usize, l: u32) -> usize {
    (n as u64 * u64::from(l)).div_ceil(64) as usize
}

fn mask(l: u32) -> u64 {
    (1u64 << l) - 1
}

fn write_low(lows: &mut [u64], i: usize, l: u32, v: u64) {
    let bit = i as u64 * u64::from(l);
    let (w, s) = ((bit / 64) as usize, (bit % 64) as u32);
    lows[w] |= v << s;
    if s + l > 64 {
        lows[w + 1] |= v >> (64 - s);
    }
}

/// The position of the `k`-th (from 0) one bit of `x`; `k` is below its count of ones.
///
/// Broadword: the ones of each byte, summed into every byte's running count by one multiply;
/// the bytes whose running count is at most `k` are counted with a per-byte comparison (no count
/// exceeds 64, so no borrow crosses a byte); then at most seven bits are cleared inside the byte
/// found.
fn select(x: u64, k: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut bytes = x - ((x >> 1) & 0x5555_5555_5555_5555);
    bytes = (bytes & 0x3333_3333_3333_3333) + ((bytes >> 2) & 0x3333_3333_3333_3333);
    bytes = (bytes + (bytes >> 4)) & 0x0F0F_0F0F_0F0F_0F0F;
    let running = bytes.wrapping_mul(ONES);
    let at_most_k = (((k * ONES) | HIGH) - running) & HIGH;
    let byte = (at_most_k >> 7).wrapping_mul(ONES) >> 56;
    let before = if byte == 0 {
        0
    } else {
        (running >> (8 * (byte - 1))) & 0xFF
    };
    let mut rest = (x >> (8 * byte)) & 0xFF;
    for _ in 0..k - before {
        rest &= rest - 1;
    }
    8 * byte + u64::from(rest.trailing_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(ids: &[u64]) {
        let set = Packed::from_sorted(ids);
        assert_eq!(set.len(), ids.len());
        assert_eq!(set.iter().len(), ids.len());
        assert!(set.iter().eq(ids.iter().copied()), "iteration of {ids:?}");
        for &id in ids {
            assert!(set.contains(id), "{id} in {ids:?}");
            for probe in [id.wrapping_sub(1), id.wrapping_add(1)] {
                assert_eq!(set.contains(probe), ids.binary_search(&probe).is_ok(), "{probe}");
            }
        }
        for probe in [0, 1, u64::MAX, u64::MAX / 2] {
            assert_eq!(set.contains(probe), ids.binary_search(&probe).is_ok(), "{probe}");
        }
    }

    #[test]
    fn select_finds_every_one() {
        let words = [
            1u64,
            u64::MAX,
            0x8000_0000_0000_0001,
            0xF0F0_0000_1234_5678,
            1 << 63,
            0xFF << 56,
        ];
        for x in words {
            let mut k = 0;
            for bit in 0..64 {
                if x >> bit & 1 == 1 {
                    assert_eq!(select(x, k), bit, "{x:#x}, one {k}");
                    k += 1;
                }
            }
        }
    }

    #[test]
    fn edges_of_the_coding() {
        check(&[]);
        check(&[0]);
        check(&[u64::MAX]);
        check(&[0, u64::MAX]);
        check(&[1, 2, 3, 4, 5]);
        check(&[7, 1 << 40, (1 << 40) + 1, u64::MAX - 1, u64::MAX]);
        // Lows that straddle a word: 63-bit lows.
        check(&[0, 1 << 63, (1 << 63) + 5]);
        // A plain array past MAX_CODED ids.
        let big: Vec<u64> = (0..MAX_CODED as u64 + 10).map(|i| i * 0x9E37_79B9_7F4A).collect();
        check(&big);
        assert!(matches!(Packed::from_sorted(&big).view(), View::Plain(_)));
    }

    /// Spread over the whole 64-bit space, 300 ids take ~59 bits each (the coding's bound,
    /// `2 + log₂(2⁶⁴ / 300)` = 57.8, the directory and the two header words), not 64.
    #[test]
    fn spread_ids_take_fewer_than_64_bits() {
        let mut ids: Vec<u64> = (1..=300u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        ids.sort_unstable();
        let set = Packed::from_sorted(&ids);
        check(&ids);
        let bits = set.heap_bytes() as f64 * 8.0 / ids.len() as f64;
        assert!(bits < 60.0, "{bits} bits per id");
    }

    proptest! {
        /// Any set, spread or bunched, codes to what it was: every id found, no other.
        #[test]
        fn a_coded_set_is_the_set(
            ids in proptest::collection::btree_set(any::<u64>(), 0..400),
            bunched in proptest::collection::btree_set(0..5_000u64, 0..400),
            base in any::<u64>(),
            probes in proptest::collection::vec(any::<u64>(), 64),
            near in proptest::collection::vec(0..6_000u64, 64),
        ) {
            let ids: Vec<u64> = ids.into_iter().collect();
            check(&ids);
            let set = Packed::from_sorted(&ids);
            for p in &probes {
                prop_assert_eq!(set.contains(*p), ids.binary_search(p).is_ok());
            }
            let bunched: Vec<u64> = bunched
                .into_iter()
                .map(|v| base.saturating_add(v))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            check(&bunched);
            let set = Packed::from_sorted(&bunched);
            for p in near.iter().map(|v| base.saturating_add(*v)) {
                prop_assert_eq!(set.contains(p), bunched.binary_search(&p).is_ok());
            }
        }
    }
}
