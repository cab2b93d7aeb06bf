//! Kinds of state row, each declared once ([`Kind`]) and registered with one line
//! ([`KINDS`]): every backend then keeps it with no code of its own for the kind.
//!
//! A state row is keyed by one 128-bit id and changed in place (a hold as it settles; later an
//! allowance's spending, a budget, a product). From its [`Fields`] description and its tag:
//!
//! - a state holds it in a [`Rows`] table that knows what changed since it was last written;
//! - a record lists the rows it reads in [`Needs::rows`](crate::Needs), and every loader
//!   (the cache's disk, a PostgreSQL working set) loads them by tag and id;
//! - a checkpoint writes each changed row under the state key `tag ‖ id`, its binary form as
//!   the value, and a marker under [`PINNED`] for a row that must stay in memory;
//! - a working set hands changed rows back in [`Changes::rows`](crate::Changes), and
//!   PostgreSQL upserts them into the kind's table, whose columns are the row's fields (the
//!   id first);
//! - an export lists them as [`Imported::Row`](crate::Imported), and an import puts them back.

use std::any::Any;
use std::collections::BTreeSet;
use std::fmt::Debug;

use farthing_kernel::{
    Binary, BinaryReader, Column, Columns, DecodeError, Fields, Get, Put, Slot, Table,
};
use farthing_ledger::IdHashBuilder;

/// A kind of state row.
pub trait Kind: 'static {
    /// Stable and never reused: the first byte of the row's state key in the engine, and the
    /// kind's tag in import items.
    const TAG: u8;
    /// The PostgreSQL table: one column per field of the row, the id first and its primary
    /// key.
    const TABLE: &'static str;
    type Row: Fields + Clone + PartialEq + Debug + Send + Sync + 'static;
    /// The row's key.
    fn id(row: &Self::Row) -> u128;
    /// Rows that every state holds in memory, whatever its budget, ordered by this (a live
    /// hold, by its deadline): what a command sweeping them (an expiry) must see without a
    /// search. `None` for a row that may live on disk alone.
    fn pin(_row: &Self::Row) -> Option<u64> {
        None
    }
}

/// The first byte of the state key that marks a pinned row: `PINNED ‖ tag ‖ id`, no value.
pub const PINNED: u8 = b'l';

/// Reads a row's fields and gives its id and stored form.
pub type GetStored = fn(&mut dyn Get) -> Result<(u128, Vec<u8>), DecodeError>;

/// A kind as code that does not know its type sees it: a registry entry.
#[derive(Clone, Copy)]
pub struct KindInfo {
    pub tag: u8,
    pub table: &'static str,
    /// The row's columns, the id first.
    pub columns: fn() -> Vec<Column>,
    /// Writes the fields of a row, given in its stored (binary) form.
    pub put: fn(&[u8], &mut dyn Put) -> Result<(), DecodeError>,
    /// Reads a row's fields and gives its id and stored form.
    pub get: GetStored,
    new_rows: fn() -> Box<dyn AnyRows>,
}

impl KindInfo {
    pub const fn of<K: Kind>() -> KindInfo {
        KindInfo {
            tag: K::TAG,
            table: K::TABLE,
            columns: Columns::list::<K::Row>,
            put: put_stored::<K>,
            get: get_stored::<K>,
            new_rows: new_rows::<K>,
        }
    }

    /// The entry of the kind with this tag.
    pub fn of_tag(tag: u8) -> Option<&'static KindInfo> {
        KINDS.iter().find(|info| info.tag == tag)
    }
}

fn put_stored<K: Kind>(bytes: &[u8], mut out: &mut dyn Put) -> Result<(), DecodeError> {
    BinaryReader::decode::<K::Row>(bytes)?.put(&mut out);
    Ok(())
}

fn get_stored<K: Kind>(mut input: &mut dyn Get) -> Result<(u128, Vec<u8>), DecodeError> {
    let row = K::Row::get(&mut input)?;
    Ok((K::id(&row), Binary::encode(&row)))
}

fn new_rows<K: Kind>() -> Box<dyn AnyRows> {
    Box::new(Rows::<K>::default())
}

pub use crate::rooms::KINDS;

/// A state row in its stored form, with its kind's tag and its id.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StoredRow {
    pub tag: u8,
    pub id: u128,
    /// The row's binary form ([`Binary`]).
    pub bytes: Vec<u8>,
}

impl StoredRow {
    pub fn of<K: Kind>(row: &K::Row) -> StoredRow {
        StoredRow {
            tag: K::TAG,
            id: K::id(row),
            bytes: Binary::encode(row),
        }
    }

    /// The row, if it is of kind `K`.
    pub fn decode<K: Kind>(&self) -> Option<Result<K::Row, DecodeError>> {
        (self.tag == K::TAG).then(|| BinaryReader::decode(&self.bytes))
    }
}

/// The rows of one kind a state holds.
pub struct Rows<K: Kind> {
    table: Table<u128, K::Row, IdHashBuilder>,
    /// Pinned rows held, by their order and id.
    pinned: BTreeSet<(u64, u128)>,
}

impl<K: Kind> Default for Rows<K> {
    fn default() -> Self {
        Rows {
            table: Table::default(),
            pinned: BTreeSet::new(),
        }
    }
}

impl<K: Kind> Rows<K> {
    pub fn get(&self, id: u128) -> Option<&K::Row> {
        self.table.get(&id)
    }

    /// Whether memory knows the row under `id`, or that there is none.
    pub fn knows(&self, id: u128) -> bool {
        self.table.slot(&id).is_some()
    }

    /// Puts a row made or changed here.
    pub fn put(&mut self, row: K::Row) {
        let id = K::id(&row);
        if let Some(pin) = self.table.get(&id).and_then(K::pin) {
            self.pinned.remove(&(pin, id));
        }
        if let Some(pin) = K::pin(&row) {
            self.pinned.insert((pin, id));
        }
        self.table.put(id, row);
    }

    /// Puts what storage holds under `id` (`None`: nothing). False when memory knows it.
    pub fn load(&mut self, id: u128, row: Option<K::Row>) -> bool {
        if self.table.slot(&id).is_some() {
            return false;
        }
        if let Some(pin) = row.as_ref().and_then(K::pin) {
            self.pinned.insert((pin, id));
        }
        self.table.load(
            id,
            match row {
                Some(row) => Slot::Present(row),
                None => Slot::Absent,
            },
        )
    }

    /// Pinned rows whose order is at most `upto`, lowest first, at most `limit`.
    pub fn pinned_upto(&self, upto: u64, limit: usize) -> Vec<u128> {
        self.pinned
            .iter()
            .take_while(|(pin, _)| *pin <= upto)
            .take(limit)
            .map(|(_, id)| *id)
            .collect()
    }

    /// The lowest order of a pinned row.
    pub fn first_pin(&self) -> Option<u64> {
        self.pinned.first().map(|(pin, _)| *pin)
    }

    pub fn pinned_count(&self) -> usize {
        self.pinned.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &K::Row> {
        self.table.iter().map(|(_, row)| row)
    }
}

/// What code that knows a kind only by its tag does with its rows.
pub(crate) trait AnyRows: Send + Sync {
    fn tag(&self) -> u8;
    /// Whether memory knows the row under `id`, or that there is none.
    fn knows(&self, id: u128) -> bool;
    /// Whether memory holds a row under `id`.
    fn has(&self, id: u128) -> bool;
    /// The row memory holds under `id`, in its stored form.
    fn get_stored(&self, id: u128) -> Option<StoredRow>;
    /// Loads what storage holds under `id`. False when memory knows it already.
    fn load_stored(&mut self, id: u128, bytes: Option<&[u8]>) -> Result<bool, DecodeError>;
    fn track_changes(&mut self);
    /// Rows changed since the last call, by id, each with whether it is pinned.
    fn take_changes(&mut self) -> Vec<(StoredRow, bool)>;
    /// Forgets rows neither changed since the changes were last taken nor pinned, in `shards`
    /// only, and only those not used in the last `unused_for` rounds.
    fn forget_unchanged_in(&mut self, shards: std::ops::Range<usize>, unused_for: u32);
    fn keys_held(&self) -> usize;
    /// Every row held, by id.
    fn stored_rows(&self) -> Vec<StoredRow>;
    /// Puts an imported row: a change.
    fn put_stored(&mut self, row: &StoredRow) -> Result<(), DecodeError>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<K: Kind> AnyRows for Rows<K> {
    fn tag(&self) -> u8 {
        K::TAG
    }

    fn knows(&self, id: u128) -> bool {
        Rows::knows(self, id)
    }

    fn has(&self, id: u128) -> bool {
        self.table.get(&id).is_some()
    }

    fn get_stored(&self, id: u128) -> Option<StoredRow> {
        self.table.get(&id).map(StoredRow::of::<K>)
    }

    fn load_stored(&mut self, id: u128, bytes: Option<&[u8]>) -> Result<bool, DecodeError> {
        let row = bytes.map(BinaryReader::decode::<K::Row>).transpose()?;
        Ok(self.load(id, row))
    }

    fn track_changes(&mut self) {
        self.table.track_changes();
    }

    fn take_changes(&mut self) -> Vec<(StoredRow, bool)> {
        let mut rows: Vec<(StoredRow, bool)> = self
            .table
            .take_changes()
            .into_iter()
            .filter_map(|(_, slot)| match slot {
                Slot::Present(row) => Some((StoredRow::of::<K>(row), K::pin(row).is_some())),
                Slot::Absent => None,
            })
            .collect();
        rows.sort_unstable_by_key(|(row, _)| row.id);
        rows
    }

    fn forget_unchanged_in(&mut self, shards: std::ops::Range<usize>, unused_for: u32) {
        let pinned: std::collections::HashSet<u128> =
            self.pinned.iter().map(|(_, id)| *id).collect();
        self.table
            .forget_unchanged_in(shards, unused_for, |id| pinned.contains(id));
    }

    fn keys_held(&self) -> usize {
        self.table.keys_held()
    }

    fn stored_rows(&self) -> Vec<StoredRow> {
        let mut rows: Vec<StoredRow> = self.iter().map(StoredRow::of::<K>).collect();
        rows.sort_unstable_by_key(|row| row.id);
        rows
    }

    fn put_stored(&mut self, row: &StoredRow) -> Result<(), DecodeError> {
        self.put(BinaryReader::decode(&row.bytes)?);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The rows of every registered kind a state holds.
pub(crate) struct Kinds {
    tables: Vec<Box<dyn AnyRows>>,
}

impl Default for Kinds {
    fn default() -> Self {
        Kinds {
            tables: KINDS.iter().map(|info| (info.new_rows)()).collect(),
        }
    }
}

impl Kinds {
    pub(crate) fn of<K: Kind>(&self) -> &Rows<K> {
        self.tag(K::TAG)
            .expect("every kind is registered")
            .as_any()
            .downcast_ref()
            .expect("a tag names one kind")
    }

    pub(crate) fn of_mut<K: Kind>(&mut self) -> &mut Rows<K> {
        self.tag_mut(K::TAG)
            .expect("every kind is registered")
            .as_any_mut()
            .downcast_mut()
            .expect("a tag names one kind")
    }

    pub(crate) fn tag(&self, tag: u8) -> Option<&dyn AnyRows> {
        self.tables
            .iter()
            .find(|table| table.tag() == tag)
            .map(|table| &**table)
    }

    pub(crate) fn tag_mut(&mut self, tag: u8) -> Option<&mut (dyn AnyRows + 'static)> {
        self.tables
            .iter_mut()
            .find(|table| table.tag() == tag)
            .map(|table| &mut **table)
    }

    pub(crate) fn all(&self) -> impl Iterator<Item = &dyn AnyRows> {
        self.tables.iter().map(|table| &**table)
    }

    pub(crate) fn all_mut(&mut self) -> impl Iterator<Item = &mut (dyn AnyRows + 'static)> {
        self.tables.iter_mut().map(|table| &mut **table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::state_kind;

    #[test]
    fn every_kind_has_a_tag_of_its_own_that_no_other_state_key_starts_with() {
        let reserved = [
            state_kind::ACCOUNT,
            state_kind::GLOBALS,
            state_kind::IDEMPOTENCY,
            state_kind::IDEMPOTENCY_BY_TIME,
            state_kind::KEY,
            state_kind::MERCHANT,
            state_kind::PAYER,
            state_kind::REFUNDED,
            state_kind::TRANSFER,
            state_kind::FORMAT,
            PINNED,
        ];
        let mut seen = std::collections::HashSet::new();
        for info in KINDS {
            assert!(!reserved.contains(&info.tag), "tag {} is taken", info.tag);
            assert!(
                seen.insert(info.tag),
                "tag {} is registered twice",
                info.tag
            );
            assert!(KindInfo::of_tag(info.tag).is_some());
            assert!(
                !(info.columns)().is_empty(),
                "{} has no columns",
                info.table
            );
        }
    }

    #[test]
    fn a_row_goes_through_its_registry_entry_unchanged() {
        use crate::rooms::holds::{Hold, HoldKind, HoldRow, HoldStatus};
        use farthing_ledger::{Amount, Timestamp, TransferId};
        let row = HoldRow {
            payment: crate::PaymentId::from_u128(7),
            hold: Hold {
                status: HoldStatus::Captured,
                amount_authorized: Amount::from_micros(10),
                amount_captured: Amount::from_micros(9),
                fee_captured: Amount::from_micros(1),
                expires_at: Timestamp(5),
                resolved_at: Some(Timestamp(4)),
                transfers: [TransferId(1), TransferId(2), TransferId(3)],
            },
        };
        let stored = StoredRow::of::<HoldKind>(&row);
        let info = KindInfo::of_tag(HoldKind::TAG).expect("registered");
        // Its fields written through the entry read back, through the entry, as the same row.
        let mut columns = Columns::default();
        (info.put)(&stored.bytes, &mut columns).expect("decodes");
        assert_eq!(columns.0, (info.columns)());
        let mut bytes = Vec::new();
        row.put(&mut Binary(&mut bytes));
        let (id, again) = (info.get)(&mut BinaryReader(&bytes)).expect("reads");
        assert_eq!((id, again), (7, stored.bytes.clone()));
        assert_eq!(stored.decode::<HoldKind>(), Some(Ok(row)));
        // A pinned row is the live one.
        let mut rows = Rows::<HoldKind>::default();
        rows.put(row);
        assert_eq!(rows.pinned_count(), 0);
        let mut live = row;
        live.hold.status = HoldStatus::Held;
        live.payment = crate::PaymentId::from_u128(8);
        rows.put(live);
        assert_eq!(rows.pinned_upto(5, 10), vec![8]);
        assert_eq!(rows.pinned_upto(4, 10), Vec::<u128>::new());
    }
}
