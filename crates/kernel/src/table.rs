//! Records of one kind, by key, with what changed since a backend last wrote them back.

use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};
use std::ops::Range;
use std::sync::atomic::{AtomicU16, Ordering};

use farthing_ledger::ShardedMap;

/// What a table holds under a key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Slot<V> {
    Present(V),
    /// Known not to exist: a working set loaded the key and found nothing, or the record was
    /// removed (which is a change like any other).
    Absent,
}

struct Row<V> {
    slot: Slot<V>,
    /// The round of changes ([`Table::take_changes`] ends one) in which the row last changed;
    /// 0 for a row never changed here.
    changed_in: u32,
    /// Whether the key is among those changed and not yet handed over.
    pending: bool,
    /// When the row was last read, loaded or changed: a cache lets the least recently used
    /// rows go first.
    used: LastUse,
}

/// The round of changes in which something was last used (read, loaded or changed), for a
/// cache that lets the least recently used go first. Marked through a shared reference, by
/// any reader: an atomic, written only at the first use in a round. Two bytes, so that a
/// row of a million-row table stays the size it was (a row's other fields leave them free):
/// the rounds count modulo 2¹⁶, so a row unused for 65,536 rounds (about half a day of
/// checkpoints back to back) counts as recently used again, and goes a turn or two later.
pub struct LastUse(AtomicU16);

impl LastUse {
    pub fn new(round: u32) -> LastUse {
        LastUse(AtomicU16::new(round as u16))
    }

    /// Notes a use in `round`.
    #[inline]
    pub fn mark(&self, round: u32) {
        let round = round as u16;
        if self.0.load(Ordering::Relaxed) != round {
            self.0.store(round, Ordering::Relaxed);
        }
    }

    /// How many rounds have begun since the last use, in `round` (0: used in it), modulo 2¹⁶.
    pub fn rounds_since(&self, round: u32) -> u32 {
        u32::from((round as u16).wrapping_sub(self.0.load(Ordering::Relaxed)))
    }
}

impl<V> Row<V> {
    fn new(slot: Slot<V>, changed_in: u32, pending: bool, round: u32) -> Row<V> {
        Row {
            slot,
            changed_in,
            pending,
            used: LastUse::new(round),
        }
    }

    /// Notes a change to the row in `round`: whether its key is newly pending (to be handed
    /// over). A row changed in this round and not pending was handed over by a stage since,
    /// and counts as changed `again`.
    fn note_change(&mut self, round: u32, again: &mut usize) -> bool {
        let newly_pending = !self.pending;
        if newly_pending {
            *again += usize::from(self.changed_in == round);
            self.pending = true;
        }
        self.changed_in = round;
        self.used.mark(round);
        newly_pending
    }
}

/// Records of one kind by key. Once [`Table::track_changes`] is called, every change (a new
/// record, an update, a removal) is remembered until it is handed over, once per key however
/// often the key changed since it was last handed over, in the order keys first changed.
/// [`Table::take_changes`] hands changes over and ends the round: no key counts as changed
/// after it ([`Table::is_changed`]). [`Table::stage_changes_map`] hands them over within the
/// round, so that a caller can copy what changed a little at a time, while it is still in
/// the processor's cache, and the round's end copies only what changed since. A table that
/// does not track (a whole state nobody writes back) remembers nothing.
pub struct Table<K, V, S = std::hash::RandomState> {
    /// Sharded, so that a table of millions never grows all at once under the state lock.
    rows: ShardedMap<K, Row<V>, S>,
    /// Keys changed since the changes were last handed over, each once.
    pending: Vec<K>,
    /// The round of changes under way. Ending a round counts up instead of visiting each row
    /// changed in it; the count wraps after 2³² rounds, when a row last changed exactly that
    /// many rounds before would count as changed (and be kept in memory a round longer).
    round: u32,
    /// Keys handed over by a stage in this round, and keys that changed again after that.
    staged: usize,
    again: usize,
    /// Present records.
    present: usize,
    tracking: bool,
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Default> Default for Table<K, V, S> {
    fn default() -> Self {
        Table {
            rows: ShardedMap::default(),
            pending: Vec::new(),
            round: 1,
            staged: 0,
            again: 0,
            present: 0,
            tracking: false,
        }
    }
}

impl<K: Eq + Hash + Clone, V, S: BuildHasher + Default> Table<K, V, S> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers changes from here on.
    pub fn track_changes(&mut self) {
        self.tracking = true;
    }

    pub fn is_tracking_changes(&self) -> bool {
        self.tracking
    }

    /// The record under `key`, if the table holds one. A use of the row
    /// ([`Table::forget_unchanged_in`] lets the least recently used go first).
    pub fn get(&self, key: &K) -> Option<&V> {
        match self.slot(key) {
            Some(Slot::Present(value)) => Some(value),
            _ => None,
        }
    }

    /// What the table knows of `key`: a record, its absence, or nothing (`None`: not loaded).
    /// A use of the row, as [`Table::get`] is.
    pub fn slot(&self, key: &K) -> Option<&Slot<V>> {
        let row = self.rows.get(key)?;
        row.used.mark(self.round);
        Some(&row.slot)
    }

    /// Whether the table holds a record under `key`, without counting it as a use: for
    /// deciding what to keep.
    pub fn holds(&self, key: &K) -> bool {
        matches!(
            self.rows.get(key),
            Some(Row {
                slot: Slot::Present(_),
                ..
            })
        )
    }

    /// The round under way: ends each time the changes are taken.
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn contains(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// How many records the table holds.
    pub fn len(&self) -> usize {
        self.present
    }

    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    /// Puts a record or an absence read from storage: not a change. Refused (`false`) when the
    /// table already knows the key, so that a load never overwrites what applying did.
    #[must_use]
    pub fn load(&mut self, key: K, slot: Slot<V>) -> bool {
        match self.rows.entry(key) {
            Entry::Occupied(_) => false,
            Entry::Vacant(vacant) => {
                if matches!(slot, Slot::Present(_)) {
                    self.present += 1;
                }
                vacant.insert(Row::new(slot, 0, false, self.round));
                true
            }
        }
    }

    /// Replaces a record read from storage with another read from storage (a loaded record
    /// completed by a later load): not a change. A changed record stays changed.
    pub fn reload(&mut self, key: K, value: V) {
        match self.rows.entry(key) {
            Entry::Occupied(mut occupied) => {
                let row = occupied.get_mut();
                if !matches!(row.slot, Slot::Present(_)) {
                    self.present += 1;
                }
                row.slot = Slot::Present(value);
                row.used.mark(self.round);
            }
            Entry::Vacant(vacant) => {
                self.present += 1;
                vacant.insert(Row::new(Slot::Present(value), 0, false, self.round));
            }
        }
    }

    /// Whether the record under `key` changed since the changes were last taken (in this
    /// round, whether handed over by a stage or not).
    pub fn is_changed(&self, key: &K) -> bool {
        self.rows
            .get(key)
            .is_some_and(|row| row.changed_in == self.round)
    }

    /// Puts a record under `key`, replacing what was there: a change.
    pub fn put(&mut self, key: K, value: V) {
        self.set(key, Slot::Present(value));
    }

    /// Removes the record under `key`: a change (the backend removes it too).
    pub fn remove(&mut self, key: &K) {
        if self.rows.contains_key(key) {
            self.set(key.clone(), Slot::Absent);
        }
    }

    fn set(&mut self, key: K, slot: Slot<V>) {
        if !self.tracking && matches!(slot, Slot::Absent) {
            // Nothing will ask which keys were removed: forget the key altogether.
            if let Some(row) = self.rows.remove(&key) {
                self.present -= usize::from(matches!(row.slot, Slot::Present(_)));
            }
            return;
        }
        let adds = usize::from(matches!(slot, Slot::Present(_)));
        match self.rows.entry(key) {
            Entry::Occupied(mut occupied) => {
                let row = occupied.get_mut();
                let had = usize::from(matches!(row.slot, Slot::Present(_)));
                self.present = self.present - had + adds;
                row.slot = slot;
                if self.tracking && row.note_change(self.round, &mut self.again) {
                    self.pending.push(occupied.key().clone());
                }
            }
            Entry::Vacant(vacant) => {
                self.present += adds;
                if self.tracking {
                    self.pending.push(vacant.key().clone());
                }
                vacant.insert(Row::new(
                    slot,
                    if self.tracking { self.round } else { 0 },
                    self.tracking,
                    self.round,
                ));
            }
        }
    }

    /// Changes the record under `key` in place: a change. `None` when there is none.
    pub fn update<T>(&mut self, key: &K, change: impl FnOnce(&mut V) -> T) -> Option<T> {
        let row = self.rows.get_mut(key)?;
        let Slot::Present(value) = &mut row.slot else {
            return None;
        };
        let result = change(value);
        if self.tracking && row.note_change(self.round, &mut self.again) {
            self.pending.push(key.clone());
        }
        Some(result)
    }

    /// Every change not yet handed over: each changed key once, with what it holds now, in
    /// the order the keys first changed since they were last handed over. Ends the round: no
    /// key counts as changed after it.
    pub fn take_changes(&mut self) -> Vec<(K, Slot<&V>)> {
        let keys = std::mem::take(&mut self.pending);
        for key in &keys {
            self.rows
                .get_mut(key)
                .expect("a changed key is held")
                .pending = false;
        }
        self.end_round();
        keys.into_iter()
            .map(|key| {
                let slot = self
                    .rows
                    .get(&key)
                    .expect("a changed key is held")
                    .slot
                    .as_ref();
                (key, slot)
            })
            .collect()
    }

    /// Keys handed over by a stage in this round, and how many of them changed again since:
    /// when most do, staging copies the same rows over and over, and the round's end would
    /// copy each once.
    pub fn staged_and_again(&self) -> (usize, usize) {
        (self.staged, self.again)
    }

    fn end_round(&mut self) {
        self.staged = 0;
        self.again = 0;
        // Round 0 is never under way: it marks rows never changed.
        self.round = self.round.checked_add(1).unwrap_or(1);
    }

    /// Forgets every record that has not changed since the changes were last taken (a cache
    /// whose storage holds them), keeping those `keep` names; returns how many were
    /// forgotten. Changed records stay until their changes are taken and written.
    pub fn forget_unchanged(&mut self, keep: impl Fn(&K) -> bool) -> usize {
        self.forget_unchanged_in(0..farthing_ledger::SHARDS, 0, keep)
    }

    /// [`Table::forget_unchanged`] for the keys of `shards` (of [`farthing_ledger::SHARDS`],
    /// by the table's own hash), and only records not used (read, loaded or changed) in the
    /// last `unused_for` rounds (0: however recently): so a cache can let rows go a few
    /// shards at a time, the least recently used first.
    pub fn forget_unchanged_in(
        &mut self,
        shards: Range<usize>,
        unused_for: u32,
        keep: impl Fn(&K) -> bool,
    ) -> usize {
        let before = self.rows.len();
        let round = self.round;
        let mut forgotten_present = 0;
        self.rows.retain_and_fit_shards(shards, |key, row| {
            let stays =
                row.changed_in == round || row.used.rounds_since(round) < unused_for || keep(key);
            if !stays && matches!(row.slot, Slot::Present(_)) {
                forgotten_present += 1;
            }
            stays
        });
        self.present -= forgotten_present;
        before - self.rows.len()
    }

    /// How many keys the table knows (records and absences).
    pub fn keys_held(&self) -> usize {
        self.rows.len()
    }

    /// [`Table::take_changes`], each change passed to `take` as it is found: one lookup a key,
    /// for a checkpoint that copies what it needs of each.
    pub fn take_changes_map<T>(&mut self, take: impl FnMut(&K, Slot<&V>) -> T) -> Vec<T> {
        let mut out = Vec::with_capacity(self.pending.len());
        self.hand_over(&mut out, take);
        self.end_round();
        out
    }

    /// Hands every change not yet handed over to `take`, as [`Table::take_changes_map`] does,
    /// and adds what it makes of each to `out`; the round goes on. A key changed again after
    /// this is handed over again.
    pub fn stage_changes_map<T>(&mut self, out: &mut Vec<T>, take: impl FnMut(&K, Slot<&V>) -> T) {
        self.staged += self.pending.len();
        self.hand_over(out, take);
    }

    fn hand_over<T>(&mut self, out: &mut Vec<T>, mut take: impl FnMut(&K, Slot<&V>) -> T) {
        out.reserve(self.pending.len());
        for key in self.pending.drain(..) {
            let row = self.rows.get_mut(&key).expect("a changed key is held");
            row.pending = false;
            out.push(take(&key, row.slot.as_ref()));
        }
    }

    /// Hands over the change of `key` at once, if `key` is the last key to have become
    /// pending: for a writer that copies a row right after changing it, while the row is in
    /// the processor's cache, rather than in a later stage. Counted as staged; a change after
    /// it makes the key pending again. `None` (and nothing handed over) otherwise.
    pub fn stage_one<T>(&mut self, key: &K, take: impl FnOnce(&K, &V) -> T) -> Option<T> {
        if self.pending.last() != Some(key) {
            return None;
        }
        let row = self.rows.get_mut(key).expect("a changed key is held");
        let Slot::Present(value) = &row.slot else {
            return None;
        };
        row.pending = false;
        self.pending.pop();
        self.staged += 1;
        Some(take(key, value))
    }

    /// How many keys changed that were not yet handed over.
    pub fn changes_pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether anything changed that was not yet handed over.
    pub fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Every record held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.rows.iter().filter_map(|(key, row)| match &row.slot {
            Slot::Present(value) => Some((key, value)),
            Slot::Absent => None,
        })
    }
}

impl<V: Copy> Slot<&V> {
    /// The record, copied, or `None` for an absence.
    pub fn map_present(self) -> Option<V> {
        match self {
            Slot::Present(value) => Some(*value),
            Slot::Absent => None,
        }
    }
}

impl<V> Slot<V> {
    pub fn as_ref(&self) -> Slot<&V> {
        match self {
            Slot::Present(value) => Slot::Present(value),
            Slot::Absent => Slot::Absent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Numbers = Table<u32, &'static str>;

    fn tracked() -> Numbers {
        let mut table = Numbers::new();
        table.track_changes();
        table
    }

    #[test]
    fn a_table_that_does_not_track_remembers_no_change_and_no_removed_key() {
        let mut table = Numbers::new();
        table.put(1, "one");
        table.update(&1, |value| *value = "un");
        table.put(2, "two");
        table.remove(&2);
        assert!(!table.has_changes());
        assert!(table.take_changes().is_empty());
        assert_eq!(table.slot(&2), None);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn each_changed_key_is_handed_over_once_in_the_order_it_first_changed() {
        let mut table = tracked();
        table.put(2, "two");
        table.put(1, "one");
        table.put(2, "deux");
        assert_eq!(table.update(&1, |value| *value = "un"), Some(()));
        assert_eq!(
            table.take_changes(),
            vec![(2, Slot::Present(&"deux")), (1, Slot::Present(&"un"))]
        );
        assert!(table.take_changes().is_empty());
        assert!(!table.has_changes());
    }

    #[test]
    fn a_row_staged_as_it_changes_is_handed_over_once_and_again_only_if_changed_again() {
        let mut table = tracked();
        table.put(1, "one");
        table.put(2, "two");
        assert_eq!(
            table.stage_one(&1, |key, value| (*key, *value)),
            None,
            "not the last"
        );
        assert_eq!(
            table.stage_one(&2, |key, value| (*key, *value)),
            Some((2, "two"))
        );
        assert_eq!(
            table.stage_one(&2, |key, value| (*key, *value)),
            None,
            "handed over"
        );
        assert_eq!(table.changes_pending(), 1);
        assert_eq!(table.update(&2, |value| *value = "deux"), Some(()));
        assert_eq!(table.staged_and_again(), (1, 1));
        assert_eq!(
            table.stage_one(&2, |key, value| (*key, *value)),
            Some((2, "deux"))
        );
        assert!(table.is_changed(&2));
        assert_eq!(table.take_changes(), vec![(1, Slot::Present(&"one"))]);
        assert!(!table.is_changed(&2));
        assert_eq!(table.staged_and_again(), (0, 0));
    }

    #[test]
    fn loads_are_not_changes_and_never_overwrite() {
        let mut table = tracked();
        assert!(table.load(1, Slot::Present("one")));
        assert!(table.load(2, Slot::Absent));
        assert!(!table.has_changes());
        table.put(3, "three");
        assert!(!table.load(3, Slot::Present("stale")));
        assert_eq!(table.get(&3), Some(&"three"));
        assert_eq!(table.slot(&2), Some(&Slot::Absent));
        assert_eq!(table.slot(&4), None);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn a_removal_is_a_change_and_the_record_is_gone() {
        let mut table = tracked();
        assert!(table.load(1, Slot::Present("one")));
        table.remove(&1);
        table.remove(&9);
        assert_eq!(table.get(&1), None);
        assert_eq!(table.len(), 0);
        assert_eq!(table.take_changes(), vec![(1, Slot::Absent)]);
    }

    #[test]
    fn changes_taken_through_a_map_are_each_key_once_in_order_and_then_none() {
        let mut table = tracked();
        assert!(table.load(7, Slot::Present("seven")));
        table.put(2, "two");
        table.update(&7, |value| *value = "sept");
        table.remove(&2);
        let taken = table.take_changes_map(|key, slot| (*key, slot.map_present()));
        assert_eq!(taken, vec![(2, None), (7, Some("sept"))]);
        assert!(!table.has_changes());
        assert!(table.take_changes_map(|key, _| *key).is_empty());
    }

    #[test]
    fn forgetting_keeps_changed_records_and_those_asked_for() {
        let mut table = tracked();
        assert!(table.load(1, Slot::Present("one")));
        assert!(table.load(2, Slot::Absent));
        assert!(table.load(3, Slot::Present("three")));
        table.put(4, "four");
        assert_eq!(table.forget_unchanged(|key| *key == 3), 2);
        assert_eq!(table.slot(&1), None);
        assert_eq!(table.slot(&2), None);
        assert_eq!(table.get(&3), Some(&"three"));
        assert_eq!(table.len(), 2);
        assert_eq!(table.take_changes(), vec![(4, Slot::Present(&"four"))]);
        assert_eq!(table.forget_unchanged(|_| false), 2);
        assert!(table.is_empty());
    }

    #[test]
    fn a_stage_hands_changes_over_within_the_round_and_a_key_changed_again_comes_again() {
        let mut table = tracked();
        assert!(table.load(1, Slot::Present("one")));
        assert!(table.load(2, Slot::Present("two")));
        table.put(3, "three");
        table.update(&1, |value| *value = "un");
        let mut staged = Vec::new();
        table.stage_changes_map(&mut staged, |key, slot| (*key, slot.map_present()));
        assert_eq!(staged, vec![(3, Some("three")), (1, Some("un"))]);
        assert!(!table.has_changes());
        // Staged rows still count as changed in the round: memory keeps them.
        assert!(table.is_changed(&1) && table.is_changed(&3) && !table.is_changed(&2));
        assert_eq!(table.forget_unchanged(|_| false), 1);
        assert_eq!(table.slot(&2), None);

        assert_eq!(table.staged_and_again(), (2, 0));
        table.update(&3, |value| *value = "trois");
        table.remove(&1);
        assert_eq!(table.staged_and_again(), (2, 2));
        table.stage_changes_map(&mut staged, |key, slot| (*key, slot.map_present()));
        assert_eq!(&staged[2..], &[(3, Some("trois")), (1, None)]);
        table.put(4, "four");
        // The round's end hands over only what changed since the last stage.
        assert_eq!(
            table.take_changes_map(|key, slot| (*key, slot.map_present())),
            vec![(4, Some("four"))]
        );
        assert!(!table.is_changed(&3) && !table.is_changed(&4));
        assert_eq!(table.staged_and_again(), (0, 0));
        assert_eq!(table.forget_unchanged(|_| false), 3);
        assert!(table.is_empty());
    }

    #[test]
    fn a_row_changed_in_an_earlier_round_is_not_changed_in_this_one() {
        let mut table = tracked();
        table.put(1, "one");
        assert_eq!(table.take_changes().len(), 1);
        table.put(2, "two");
        assert!(!table.is_changed(&1));
        assert!(table.is_changed(&2));
        assert_eq!(table.forget_unchanged(|_| false), 1);
        assert_eq!(table.get(&2), Some(&"two"));
    }

    #[test]
    fn forgetting_in_shards_lets_go_only_their_rows_and_only_those_unused_long_enough() {
        use farthing_ledger::SHARDS;
        let mut table: Table<u32, u32, farthing_ledger::IdHashBuilder> = Table::new();
        table.track_changes();
        for key in 0..1_000 {
            assert!(table.load(key, Slot::Present(key)));
        }
        // Three rounds: rows loaded in the first; half read in the third.
        table.take_changes();
        table.take_changes();
        for key in (0..1_000).filter(|key| key % 2 == 0) {
            assert_eq!(table.get(&key), Some(&key));
        }
        // A row changed in this round stays whatever its shard and use.
        table.put(1, 10);
        // Looking without using: not a use.
        assert!((0..1_000).all(|key| table.holds(&key)));

        // Shards 0..8 only, rows unused for at least one round: the odd keys there but 1.
        // Whether a key falls in shards 0..8: a map of it alone, emptied there, is empty.
        let in_range = |key: &u32| {
            let mut probe: ShardedMap<u32, (), farthing_ledger::IdHashBuilder> = ShardedMap::new();
            probe.insert(*key, ());
            probe.retain_and_fit_shards(0..8, |_, _| false);
            probe.is_empty()
        };
        let forgotten = table.forget_unchanged_in(0..8, 1, |_| false);
        let expected: Vec<u32> = (0..1_000)
            .filter(|key| key % 2 == 1 && *key != 1 && in_range(key))
            .collect();
        assert!(!expected.is_empty() && expected.len() < 500 && !expected.contains(&3));
        assert_eq!(forgotten, expected.len());
        for key in 0..1_000 {
            assert_eq!(table.holds(&key), !expected.contains(&key), "key {key}");
        }
        assert_eq!(table.len(), 1_000 - expected.len());

        // Rows unused for three rounds or more: none are (the odd ones were used by loading,
        // two rounds ago), so nothing goes.
        assert_eq!(table.forget_unchanged_in(0..SHARDS, 3, |_| false), 0);
        // Unused for two: every odd key left but 1, and the rows `keep` names stay.
        let forgotten = table.forget_unchanged_in(0..SHARDS, 2, |key| *key == 3);
        assert_eq!(forgotten, 500 - 2 - expected.len());
        assert!(table.holds(&1) && table.holds(&3) && !table.holds(&5));
        // However recently used: everything not changed in this round but what `keep` names.
        assert_eq!(
            table.forget_unchanged_in(0..SHARDS, 0, |key| *key == 3),
            500
        );
        assert_eq!(table.len(), 2);
        assert_eq!(table.get(&1), Some(&10));
    }

    #[test]
    fn an_update_of_a_missing_record_changes_nothing() {
        let mut table = tracked();
        assert!(table.load(1, Slot::Absent));
        assert_eq!(table.update(&1, |_| ()), None);
        assert_eq!(table.update(&2, |_| ()), None);
        assert!(!table.has_changes());
    }
}
