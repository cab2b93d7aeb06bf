//! A hash map kept in shards, so that it never grows all at once.
//!
//! A std `HashMap` grows by doubling: the insert that fills it moves every entry into a table
//! twice the size, under whatever lock the caller holds. With a million accounts or payers
//! that one insert takes hundreds of milliseconds, and every request waits behind it. A
//! [`ShardedMap`] is [`SHARDS`] maps, each holding the keys whose hash falls to it; a shard
//! doubles when it fills, and since shards fill at slightly different moments, a map of a
//! million entries grows in steps of a few tens of thousands, spread over many inserts.
//!
//! [`ShardedMap::retain_and_fit`] is how a cache lets rows go: each shard keeps what it is
//! told to and shrinks to fit, and reading the rows back grows the shards again one by one.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};

/// Shards in a [`ShardedMap`]: a power of two.
pub const SHARDS: usize = 64;

/// A hash map in [`SHARDS`] shards (see the module's documentation). Lookups cost one hash
/// more than a `HashMap`'s: one to find the shard, one inside it.
#[derive(Clone)]
pub struct ShardedMap<K, V, S = std::hash::RandomState> {
    shards: Box<[HashMap<K, V, S>]>,
    /// Picks the shard. Bits of its hash that the shard's own table does not use for buckets
    /// (low bits) or tags (the top seven) decide it, so each shard's keys still spread.
    router: S,
}

impl<K: std::fmt::Debug, V: std::fmt::Debug, S> std::fmt::Debug for ShardedMap<K, V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.shards.iter().flatten()).finish()
    }
}

impl<K, V, S: Default> Default for ShardedMap<K, V, S> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| HashMap::default()).collect(),
            router: S::default(),
        }
    }
}

impl<K: Eq + Hash, V, S: BuildHasher + Default> ShardedMap<K, V, S> {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    fn shard_of(&self, key: &K) -> usize {
        (self.router.hash_one(key) >> 40) as usize & (SHARDS - 1)
    }

    #[inline]
    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard_of(key)].get(key)
    }

    #[inline]
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let shard = self.shard_of(key);
        self.shards[shard].get_mut(key)
    }

    #[inline]
    pub fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    #[inline]
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        self.shards[shard].insert(key, value)
    }

    #[inline]
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let shard = self.shard_of(key);
        self.shards[shard].remove(key)
    }

    #[inline]
    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let shard = self.shard_of(&key);
        self.shards[shard].entry(key)
    }

    /// The values under two keys at once, each `None` where missing.
    ///
    /// # Panics
    ///
    /// If the two keys are the same, as `HashMap::get_disjoint_mut` does.
    pub fn get_disjoint_mut(&mut self, [first, second]: [&K; 2]) -> [Option<&mut V>; 2] {
        let (at_first, at_second) = (self.shard_of(first), self.shard_of(second));
        if at_first == at_second {
            return self.shards[at_first].get_disjoint_mut([first, second]);
        }
        let [one, other] = self
            .shards
            .get_disjoint_mut([at_first, at_second])
            .expect("two different shards");
        [one.get_mut(first), other.get_mut(second)]
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// Entries the shards hold room for, in all.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(HashMap::capacity).sum()
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(HashMap::values)
    }

    /// Keeps the entries `keep` names and fits each shard to what it keeps, so the memory let
    /// go can be given back. Reading the rows back later grows the shards again, each on its
    /// own: never every row at once.
    pub fn retain_and_fit(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.retain_and_fit_shards(0..SHARDS, keep);
    }

    /// [`ShardedMap::retain_and_fit`] in the shards `shards` only (a range within
    /// [`SHARDS`]): so the rows can be let go a few shards at a time.
    pub fn retain_and_fit_shards(
        &mut self,
        shards: std::ops::Range<usize>,
        mut keep: impl FnMut(&K, &mut V) -> bool,
    ) {
        for shard in &mut self.shards[shards] {
            shard.retain(&mut keep);
            shard.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdHashBuilder;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        Bump(u64),
        Swap(u64, u64),
        Retain(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so operations meet the same keys again.
        let key = 0u64..300;
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            key.clone().prop_map(Op::Bump),
            (key.clone(), key).prop_map(|(a, b)| Op::Swap(a, b)),
            (2u64..5).prop_map(Op::Retain),
        ]
    }

    proptest! {
        /// Whatever is done to it, a sharded map holds what one `HashMap` given the same
        /// operations holds.
        #[test]
        fn a_sharded_map_holds_what_one_map_holds(ops in prop::collection::vec(op(), 1..400)) {
            let mut sharded: ShardedMap<u64, u32, IdHashBuilder> = ShardedMap::new();
            let mut plain: HashMap<u64, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        prop_assert_eq!(sharded.insert(k, v), plain.insert(k, v));
                    }
                    Op::Remove(k) => prop_assert_eq!(sharded.remove(&k), plain.remove(&k)),
                    Op::Bump(k) => {
                        *sharded.entry(k).or_default() += 1;
                        *plain.entry(k).or_default() += 1;
                    }
                    Op::Swap(a, b) if a != b => {
                        let [x, y] = sharded.get_disjoint_mut([&a, &b]);
                        if let (Some(x), Some(y)) = (x, y) {
                            std::mem::swap(x, y);
                        }
                        let [x, y] = plain.get_disjoint_mut([&a, &b]);
                        if let (Some(x), Some(y)) = (x, y) {
                            std::mem::swap(x, y);
                        }
                    }
                    Op::Swap(..) => {}
                    Op::Retain(every) => {
                        sharded.retain_and_fit(|k, _| k % every != 0);
                        plain.retain(|k, _| k % every != 0);
                    }
                }
                prop_assert_eq!(sharded.len(), plain.len());
            }
            let mut held: Vec<_> = sharded.iter().map(|(k, v)| (*k, *v)).collect();
            held.sort_unstable();
            let mut expected: Vec<_> = plain.into_iter().collect();
            expected.sort_unstable();
            prop_assert_eq!(held, expected);
        }
    }

    #[test]
    fn keys_spread_over_every_shard_and_no_shard_holds_far_more_than_its_share() {
        let mut map: ShardedMap<u64, (), IdHashBuilder> = ShardedMap::new();
        for key in 0..64_000u64 {
            map.insert(key, ());
        }
        let sizes: Vec<usize> = map.shards.iter().map(HashMap::len).collect();
        let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        assert!(*least > 800 && *most < 1200, "shard sizes {least}..{most}");
    }

    /// Rows moved by the insert that grows the map most: a plain map moves them all.
    fn largest_growth(rows: u64, forget_first: bool) -> (usize, usize) {
        let mut map: ShardedMap<u64, u64, IdHashBuilder> = ShardedMap::new();
        if forget_first {
            for key in 0..rows {
                map.insert(key, key);
            }
            map.retain_and_fit(|key, _| key % 100 == 0);
        }
        let mut largest = 0;
        for key in 0..rows {
            let shard = map.shard_of(&key);
            let room = map.shards[shard].capacity();
            let held = map.shards[shard].len();
            map.insert(key, key);
            if map.shards[shard].capacity() != room {
                largest = largest.max(held);
            }
        }
        (largest, map.len())
    }

    #[test]
    fn no_insert_moves_more_than_a_shards_rows_whether_filling_or_reading_back() {
        for forget_first in [false, true] {
            let (largest, held) = largest_growth(200_000, forget_first);
            assert!(
                // A plain map's last growth moves half of it or more.
                largest > 0 && largest <= held / 16,
                "the largest growth moved {largest} of {held} rows (forgot first: {forget_first})"
            );
        }
    }
}
