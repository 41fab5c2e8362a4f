//! Hash maps and sets keyed by user ids, for the push path.
//!
//! Every delivered push looks a viewer and its friends up in several such maps (presence's
//! viewers, what they know of their friends, revocations, the latest locations, the sessions
//! table); std's SipHash made those lookups a visible part of the push's CPU. These use foldhash
//! (hashbrown's own default), seeded at random per map, as std's are: keys come from users, and a
//! fixed seed would let someone who picks ids make one map slow.

/// A `HashMap` with foldhash's randomly seeded fast hasher.
pub type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A `HashSet` with foldhash's randomly seeded fast hasher.
pub type Set<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
