//! Where a cached state's rows live when memory does not hold them: the history and the state
//! that checkpoints wrote (ADR 0004). The embedded store answers through [`Disk`]; this module
//! says what is kept under which key, so the store itself only moves bytes.
//!
//! **History** keys are an id (16 bytes, big-endian) and a kind byte. Ids grow with time
//! (`TimeOrderedIds`), so each checkpoint's rows are a run of keys after every earlier one.
//! **State** keys are a kind byte and the row's own key.

use farthing_kernel::{Binary, BinaryReader, DecodeError, Fields, Get, Put};
use farthing_ledger::{Account, AccountId, Currency, Timestamp, TransferId};
use smallvec::SmallVec;

use crate::ids::{MerchantId, PayerId, PaymentId};
use crate::model::*;

/// Rows a checkpoint wrote, read back by key. Reads run under the state's read lock, so they
/// see the state and its disk at one moment: rows leave memory only under the write lock,
/// after a checkpoint holding them is durable.
pub trait Disk: Send + Sync {
    /// The history row under `key`, if a finished checkpoint wrote it. A row of a checkpoint
    /// cut short (its history written, its state not) is absent.
    fn history(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiskError>;
    /// The state entry under `key`.
    fn state(&self, key: &[u8]) -> Result<Option<Vec<u8>>, DiskError>;
    /// No history row on disk has an id above this: a larger id is free without a lookup.
    fn history_id_max(&self) -> u128;
    /// Every state entry whose key starts with `prefix`, in key order.
    fn scan_state(&self, prefix: &[u8]) -> Rows<'_>;
}

/// A read the disk could not answer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DiskError(pub String);

impl std::fmt::Display for DiskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DiskError {}

impl From<DecodeError> for DiskError {
    fn from(error: DecodeError) -> Self {
        DiskError(format!("a stored row does not decode: {error}"))
    }
}

/// Kinds of history row: the byte after the id.
pub mod history_kind {
    pub const PAYMENT: u8 = b'p';
    pub const TOPUP: u8 = b't';
    pub const REFUND: u8 = b'r';
    pub const TRANSFER: u8 = b'x';
    /// A statement line an import brought for an object made before it: the object's id.
    pub const LINE_OF_TOPUP: u8 = b'1';
    pub const LINE_OF_PAYMENT: u8 = b'2';
    pub const LINE_OF_REFUND: u8 = b'3';
}

/// Kinds of state entry: the first byte.
pub mod state_kind {
    pub const ACCOUNT: u8 = b'a';
    pub const GLOBALS: u8 = b'g';
    pub const IDEMPOTENCY: u8 = b'i';
    /// Idempotency keys by the time they were made, for pruning: no value.
    pub const IDEMPOTENCY_BY_TIME: u8 = b'j';
    pub const KEY: u8 = b'k';
    pub const MERCHANT: u8 = b'm';
    pub const PAYER: u8 = b'p';
    pub const REFUNDED: u8 = b'r';
    // Registered kinds of state row take their own tags (`crate::kinds`; a hold's is `h`),
    // and `l` marks pinned rows (`crate::kinds::PINNED`).
    /// A transfer record whose hold state changed after its history row was written: read
    /// before the history row.
    pub const TRANSFER: u8 = b'x';
    /// The format the state was written in ([`super::STATE_FORMAT`]): absent before format 2.
    pub const FORMAT: u8 = b'v';
}

/// The stored form of the state this build reads and writes. Format 2 keeps a payer's
/// accounts in the payer's row; format 1 kept them in account rows of their own.
pub const STATE_FORMAT: u32 = 2;

/// The key of the state's format.
pub const FORMAT_KEY: &[u8] = &[state_kind::FORMAT];

/// The state's format as stored: every checkpoint writes it.
pub fn format_value() -> [u8; 4] {
    STATE_FORMAT.to_le_bytes()
}

/// Whether `disk` holds a state written in a format before [`STATE_FORMAT`]. Refuses a
/// format newer than this build reads.
pub fn needs_upgrade(disk: &dyn Disk) -> Result<bool, DiskError> {
    match disk.state(FORMAT_KEY)? {
        Some(bytes) => {
            let format = <[u8; 4]>::try_from(bytes.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| DiskError("the state's format is not 4 bytes".to_string()))?;
            if format == STATE_FORMAT {
                Ok(false)
            } else {
                Err(DiskError(format!(
                    "the state was written in format {format}; this build reads format {STATE_FORMAT}"
                )))
            }
        }
        // Nothing written yet, or written before formats were named (format 1).
        None => Ok(disk.state(GLOBALS_KEY)?.is_some()),
    }
}

/// Puts into `out` what brings a disk written in an earlier format to [`STATE_FORMAT`]:
/// `false` (and nothing put) when it is there already, or holds nothing yet. Written as one
/// state change at the disk's own position, it moves each payer's accounts into its row and
/// removes their own rows. Refuses a format newer than this build reads.
pub fn upgrade_state(disk: &dyn Disk, out: &mut StateChanges) -> Result<bool, DiskError> {
    if !needs_upgrade(disk)? {
        return Ok(false);
    }
    for entry in disk.scan_state(&[state_kind::PAYER]) {
        let (key, value) = entry?;
        let PayerStateV1(mut row) = decode(&value)?;
        for (_, id) in &row.lists.accounts {
            let account_key = account_key(*id);
            let bytes = disk.state(&account_key)?.ok_or_else(|| {
                DiskError(format!(
                    "payer {}'s account {} is missing",
                    row.payer.id, id.0
                ))
            })?;
            let AccountRow { account, .. } = decode(&bytes)?;
            row.accounts.push(account);
            out.remove(&account_key);
        }
        out.put_row(&key, &row);
    }
    out.put(FORMAT_KEY, &format_value());
    Ok(true)
}

/// A history key.
pub fn history_key(id: u128, kind: u8) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[..16].copy_from_slice(&id.to_be_bytes());
    key[16] = kind;
    key
}

/// The id a history key starts with.
pub fn history_key_id(key: &[u8]) -> Option<u128> {
    Some(u128::from_be_bytes(key.get(..16)?.try_into().ok()?))
}

pub(crate) fn line_key(object: EntryObject) -> [u8; 17] {
    match object {
        EntryObject::Topup(id) => history_key(id.to_u128(), history_kind::LINE_OF_TOPUP),
        EntryObject::Payment(id) => history_key(id.to_u128(), history_kind::LINE_OF_PAYMENT),
        EntryObject::Refund(id) => history_key(id.to_u128(), history_kind::LINE_OF_REFUND),
    }
}

/// A state key of a fixed length: a kind byte and a body of `N - 1` bytes.
fn fixed_key<const N: usize, const B: usize>(kind: u8, body: [u8; B]) -> [u8; N] {
    const { assert!(N == B + 1) };
    let mut key = [0u8; N];
    key[0] = kind;
    key[1..].copy_from_slice(&body);
    key
}

pub(crate) fn state_key(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + body.len());
    key.push(kind);
    key.extend_from_slice(body);
    key
}

pub fn account_key(id: AccountId) -> [u8; 9] {
    fixed_key(state_kind::ACCOUNT, id.0.to_be_bytes())
}

pub(crate) fn merchant_key(id: MerchantId) -> [u8; 17] {
    fixed_key(state_kind::MERCHANT, id.to_u128().to_be_bytes())
}

pub fn payer_key(id: PayerId) -> [u8; 17] {
    fixed_key(state_kind::PAYER, id.to_u128().to_be_bytes())
}

pub(crate) fn key_key(key_hash: &KeyHash) -> Vec<u8> {
    state_key(state_kind::KEY, &key_hash.0)
}

/// The state key of a registered kind's row: its tag, then its id.
pub fn row_key(tag: u8, id: u128) -> Vec<u8> {
    state_key(tag, &id.to_be_bytes())
}

/// The marker of a pinned row: [`crate::kinds::PINNED`], the row's tag, its id.
pub(crate) fn pinned_key(tag: u8, id: u128) -> Vec<u8> {
    let mut body = Vec::with_capacity(17);
    body.push(tag);
    body.extend_from_slice(&id.to_be_bytes());
    state_key(crate::kinds::PINNED, &body)
}

/// The tag and id a pinned row's marker names.
pub(crate) fn pinned_of(key: &[u8]) -> Option<(u8, u128)> {
    let (&tag, id) = key.get(1..)?.split_first()?;
    Some((tag, history_key_id(id)?))
}

pub(crate) fn transfer_state_key(id: TransferId) -> [u8; 17] {
    fixed_key(state_kind::TRANSFER, id.0.to_be_bytes())
}

pub(crate) fn refunded_key(id: PaymentId) -> [u8; 17] {
    fixed_key(state_kind::REFUNDED, id.to_u128().to_be_bytes())
}

/// An idempotency key as key bytes: its principal's kind and id, then the key itself.
fn idempotency_key_body(key: &IdempotencyKey) -> Vec<u8> {
    let (kind, id) = key.principal.code_and_id();
    let mut body = Vec::with_capacity(17 + key.key.len());
    body.push(kind);
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(key.key.as_bytes());
    body
}

pub(crate) fn idempotency_key(key: &IdempotencyKey) -> Vec<u8> {
    state_key(state_kind::IDEMPOTENCY, &idempotency_key_body(key))
}

/// The pruning index's key of an idempotency key made at `made`.
pub(crate) fn idempotency_by_time_key(made: Timestamp, key: &IdempotencyKey) -> Vec<u8> {
    let mut body = made.0.to_be_bytes().to_vec();
    body.extend_from_slice(&idempotency_key_body(key));
    state_key(state_kind::IDEMPOTENCY_BY_TIME, &body)
}

/// The prefix of the pruning index: its entries sort by the time their key was made.
pub const IDEMPOTENCY_BY_TIME_PREFIX: &[u8] = &[state_kind::IDEMPOTENCY_BY_TIME];

/// For an entry of the pruning index made before `before`: the two keys to remove (the
/// index entry and the idempotency key's row). `None` for an entry made at or after it.
pub fn pruned_by(index_key: &[u8], before: Timestamp) -> Option<[Vec<u8>; 2]> {
    let made = u64::from_be_bytes(index_key.get(1..9)?.try_into().ok()?);
    if made >= before.0 {
        return None;
    }
    Some([
        index_key.to_vec(),
        state_key(state_kind::IDEMPOTENCY, &index_key[9..]),
    ])
}

pub(crate) const GLOBALS_KEY: &[u8] = &[state_kind::GLOBALS];

pub(crate) fn encode<T: Fields>(row: &T) -> Vec<u8> {
    Binary::encode(row)
}

/// State changes gathered for one checkpoint, in one buffer: each key and its encoded value
/// written end to end as they come, then put in key order for the engine, which takes
/// strictly increasing keys. A checkpoint changes hundreds of thousands of entries; held as
/// two vectors each they cost two allocations an entry, freed in an order unlike the one they
/// were made in, and a sort that moved them through pointers into memory long cold.
#[derive(Default)]
pub struct StateChanges {
    bytes: Vec<u8>,
    entries: Vec<ChangeAt>,
}

/// Where one change is in [`StateChanges`]' buffer: its key at `at`, its value just after.
#[derive(Clone, Copy)]
struct ChangeAt {
    /// The key's first 16 bytes as one big-endian integer (shorter keys padded with zeros):
    /// orders keys as their bytes do but for ties, without reading them.
    leading: u128,
    at: usize,
    key_len: u32,
    /// The value's length, or [`REMOVED`].
    value_len: u32,
}

/// The value length of a change that removes its key.
const REMOVED: u32 = u32::MAX;

impl StateChanges {
    /// Forgets every change and keeps the room they took, for the next checkpoint's; a room
    /// more than twice what they took is given back first, so that one large checkpoint (an
    /// import's, a long replay's) does not leave its size held for good.
    pub fn clear(&mut self) {
        if self.bytes.capacity() > 2 * self.bytes.len() {
            self.bytes.shrink_to(self.bytes.len());
        }
        if self.entries.capacity() > 2 * self.entries.len() {
            self.entries.shrink_to(self.entries.len());
        }
        self.bytes.clear();
        self.entries.clear();
    }

    /// Changes given since the last [`StateChanges::clear`], a key given twice counted twice
    /// until [`StateChanges::in_key_order`] keeps its last.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Puts the value `encode` appends under `key`.
    pub fn put_with(&mut self, key: &[u8], encode: impl FnOnce(&mut Vec<u8>)) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(key);
        encode(&mut self.bytes);
        let value_len = u32::try_from(self.bytes.len() - at - key.len())
            .ok()
            .filter(|len| *len != REMOVED)
            .expect("a state entry is smaller than 4 GiB");
        self.push(key, at, value_len);
    }

    /// Puts the binary form of `row` under `key`.
    pub fn put_row<T: Fields>(&mut self, key: &[u8], row: &T) {
        self.put_with(key, |out| row.put(&mut Binary(out)));
    }

    /// Puts `value` under `key`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.put_with(key, |out| out.extend_from_slice(value));
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &[u8]) {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(key);
        self.push(key, at, REMOVED);
    }

    fn push(&mut self, key: &[u8], at: usize, value_len: u32) {
        assert!(!key.is_empty(), "a state key is never empty");
        self.entries.push(ChangeAt {
            leading: leading_u128(key),
            at,
            key_len: u32::try_from(key.len()).expect("a state key is short"),
            value_len,
        });
    }

    /// The changes in strictly increasing key order, each key once with the last change
    /// given for it.
    pub fn in_key_order(&mut self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> + '_ {
        let bytes = &self.bytes;
        let key = |change: &ChangeAt| &bytes[change.at..change.at + change.key_len as usize];
        // Each key's last change first among its equals, so that `dedup` keeps it.
        self.entries.sort_unstable_by(|a, b| {
            a.leading
                .cmp(&b.leading)
                .then_with(|| key(a).cmp(key(b)))
                .then(b.at.cmp(&a.at))
        });
        self.entries.dedup_by(|later, kept| key(later) == key(kept));
        self.entries.iter().map(move |change| {
            let key_end = change.at + change.key_len as usize;
            let value = (change.value_len != REMOVED)
                .then(|| &bytes[key_end..key_end + change.value_len as usize]);
            (&bytes[change.at..key_end], value)
        })
    }
}

/// A key's first 16 bytes as one big-endian integer, shorter keys padded with zeros.
fn leading_u128(key: &[u8]) -> u128 {
    let mut leading = [0u8; 16];
    let n = key.len().min(16);
    leading[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(leading)
}

/// A stored row, decoded.
pub fn decode<T: Fields>(bytes: &[u8]) -> Result<T, DiskError> {
    Ok(BinaryReader::decode(bytes)?)
}

/// A party's lists: the newest item of each, and its accounts.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct PartyLists {
    pub newest_payment: Option<PaymentId>,
    /// The payer's newest statement line (merchants have no statement).
    pub newest_line: Option<EntryObject>,
    /// Most parties hold one currency: its account is kept in place, with no allocation of
    /// its own (a million cached payers hold a million of these).
    pub accounts: SmallVec<[(Currency, AccountId); 1]>,
}

impl Fields for PartyLists {
    fn put(&self, out: &mut impl Put) {
        out.opt_id(
            "newest_payment",
            self.newest_payment.map(PaymentId::to_u128),
        );
        out.flag("has_newest_line", self.newest_line.is_some());
        if let Some(object) = self.newest_line {
            object.put_fields(out);
        }
        out.word(
            "account_count",
            u32::try_from(self.accounts.len()).expect("a party has a few accounts"),
        );
        for (currency, id) in &self.accounts {
            out.currency("currency", *currency);
            out.bits("account_id", id.0);
        }
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let newest_payment = input.opt_id("newest_payment")?.map(PaymentId::from_u128);
        let newest_line = if input.flag("has_newest_line")? {
            Some(EntryObject::get_fields(input)?)
        } else {
            None
        };
        let count = input.word("account_count")?;
        let mut accounts = SmallVec::new();
        for _ in 0..count {
            accounts.push((
                input.currency("currency")?,
                AccountId(input.bits("account_id")?),
            ));
        }
        Ok(PartyLists {
            newest_payment,
            newest_line,
            accounts,
        })
    }
}

/// A merchant as a cache keeps it on disk: the merchant and its lists.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MerchantState {
    pub merchant: std::sync::Arc<Merchant>,
    pub lists: PartyLists,
}

impl Fields for MerchantState {
    fn put(&self, out: &mut impl Put) {
        let merchant = &self.merchant;
        out.id("id", merchant.id.to_u128());
        out.text("name", &merchant.name);
        out.word("fee_bps", merchant.fee.bps);
        out.wide("fee_fixed", merchant.fee.fixed.micros());
        out.int("created_at", merchant.created_at.0);
        self.lists.put(out);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let merchant = Merchant {
            id: MerchantId::from_u128(input.id("id")?),
            name: input.text("name")?,
            fee: FeeSchedule {
                bps: input.word("fee_bps")?,
                fixed: farthing_ledger::Amount::from_micros(input.wide("fee_fixed")?),
            },
            created_at: Timestamp(input.int("created_at")?),
        };
        Ok(MerchantState {
            merchant: std::sync::Arc::new(merchant),
            lists: PartyLists::get(input)?,
        })
    }
}

/// A payer as a cache keeps it on disk: the payer, its lists and its accounts, in one row
/// (format 2, [`STATE_FORMAT`]). A payment changes a payer's lists and its wallet together,
/// so one row a payer rather than two halves what a checkpoint writes and the engine merges.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PayerState {
    pub payer: std::sync::Arc<Payer>,
    pub lists: PartyLists,
    /// The payer's accounts, in the order of `lists.accounts`.
    pub accounts: SmallVec<[Account; 1]>,
}

impl PayerState {
    fn put_payer_and_lists(&self, out: &mut impl Put) {
        out.id("id", self.payer.id.to_u128());
        out.text("name", &self.payer.name);
        out.int("created_at", self.payer.created_at.0);
        self.lists.put(out);
    }

    fn get_payer_and_lists(input: &mut impl Get) -> Result<Self, DecodeError> {
        let payer = Payer {
            id: PayerId::from_u128(input.id("id")?),
            name: input.text("name")?,
            created_at: Timestamp(input.int("created_at")?),
        };
        Ok(PayerState {
            payer: std::sync::Arc::new(payer),
            lists: PartyLists::get(input)?,
            accounts: SmallVec::new(),
        })
    }

    /// Each account with its owner, as the ledger holds it.
    pub fn account_rows(&self) -> impl Iterator<Item = AccountRow> + '_ {
        let owner = Owner::Payer(self.payer.id);
        self.accounts.iter().map(move |account| AccountRow {
            owner,
            account: *account,
        })
    }
}

impl Fields for PayerState {
    fn put(&self, out: &mut impl Put) {
        assert_eq!(
            self.accounts.len(),
            self.lists.accounts.len(),
            "a payer's row holds each account it lists"
        );
        self.put_payer_and_lists(out);
        for account in &self.accounts {
            account.put(out);
        }
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let mut state = PayerState::get_payer_and_lists(input)?;
        for (currency, id) in &state.lists.accounts {
            let account = Account::get(input)?;
            if account.id != *id || account.currency != *currency {
                return Err(DecodeError::Inconsistent(
                    "a payer's account is not the one it lists",
                ));
            }
            state.accounts.push(account);
        }
        Ok(state)
    }
}

/// A payer's row as format 1 kept it: the payer and its lists, its accounts in rows of their
/// own. Read once, when an engine of format 1 is brought up to date ([`upgrade_state`]).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PayerStateV1(pub PayerState);

impl Fields for PayerStateV1 {
    fn put(&self, out: &mut impl Put) {
        self.0.put_payer_and_lists(out);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        PayerState::get_payer_and_lists(input).map(PayerStateV1)
    }
}

/// Whose a key hash is, as stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct KeyOwner(pub(crate) Principal);

impl Fields for KeyOwner {
    fn put(&self, out: &mut impl Put) {
        self.0.put_fields(out, "principal_kind", "principal_id");
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(KeyOwner(Principal::get_fields(
            input,
            "principal_kind",
            "principal_id",
        )?))
    }
}

/// What a cached state keeps beside its rows: where it stands.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Globals {
    /// Records applied: the journal position the state reflects.
    pub records_applied: u64,
    pub last_time: Timestamp,
    /// The newest payment: the head of the operator's list.
    pub newest_payment: Option<PaymentId>,
    pub operator_key: Option<KeyHash>,
    /// Idempotency keys made before this were pruned.
    pub pruned_before: Timestamp,
    pub merchants: u64,
    pub payers: u64,
    pub payments: u64,
    pub transfers: u64,
}

impl Fields for Globals {
    fn put(&self, out: &mut impl Put) {
        out.int("records_applied", self.records_applied);
        out.int("last_time", self.last_time.0);
        out.opt_id(
            "newest_payment",
            self.newest_payment.map(PaymentId::to_u128),
        );
        out.flag("has_operator_key", self.operator_key.is_some());
        if let Some(key) = &self.operator_key {
            out.digest("operator_key", &key.0);
        }
        out.int("pruned_before", self.pruned_before.0);
        out.int("merchants", self.merchants);
        out.int("payers", self.payers);
        out.int("payments", self.payments);
        out.int("transfers", self.transfers);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let records_applied = input.int("records_applied")?;
        let last_time = Timestamp(input.int("last_time")?);
        let newest_payment = input.opt_id("newest_payment")?.map(PaymentId::from_u128);
        let operator_key = if input.flag("has_operator_key")? {
            Some(KeyHash(input.digest("operator_key")?))
        } else {
            None
        };
        Ok(Globals {
            records_applied,
            last_time,
            newest_payment,
            operator_key,
            pruned_before: Timestamp(input.int("pruned_before")?),
            merchants: input.int("merchants")?,
            payers: input.int("payers")?,
            payments: input.int("payments")?,
            transfers: input.int("transfers")?,
        })
    }
}

/// The history key of a transfer record.
pub(crate) fn transfer_key(id: TransferId) -> [u8; 17] {
    history_key(id.0, history_kind::TRANSFER)
}

/// Rows in key order, as a scan of a disk gives them.
pub type Rows<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Vec<u8>), DiskError>> + 'a>;

/// A disk that can also be read whole, in key order: for copies of a whole installation.
pub trait DiskScan: Disk {
    /// Every history row a finished checkpoint wrote.
    fn scan_history(&self) -> Rows<'_>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use farthing_ledger::AccountKind;

    fn payer_with(accounts: &[(&str, u64)]) -> PayerState {
        let mut state = PayerState {
            payer: std::sync::Arc::new(Payer {
                id: PayerId::from_u128(7),
                name: "ada".into(),
                created_at: Timestamp(3),
            }),
            lists: PartyLists::default(),
            accounts: SmallVec::new(),
        };
        for (n, (code, credits)) in (1u64..).zip(accounts) {
            let currency = Currency::parse(code).expect("a currency");
            state.lists.accounts.push((currency, AccountId(n)));
            state.accounts.push(Account {
                id: AccountId(n),
                kind: AccountKind::PayerWallet,
                currency,
                debits_posted: n,
                credits_posted: *credits,
                debits_pending: 0,
                credits_pending: n * 2,
            });
        }
        state
    }

    #[test]
    fn a_payers_row_keeps_its_accounts_and_its_first_format_does_not() {
        let state = payer_with(&[("USD", 500), ("EUR", 900)]);
        let bytes = Binary::encode(&state);
        assert_eq!(decode::<PayerState>(&bytes), Ok(state.clone()));

        let first = Binary::encode(&PayerStateV1(state.clone()));
        let PayerStateV1(read) = decode(&first).expect("decodes");
        assert_eq!((read.payer, read.lists), (state.payer, state.lists));
        assert!(read.accounts.is_empty());
        // Either form read as the other is refused, never misread.
        assert!(decode::<PayerState>(&first).is_err());
        assert!(decode::<PayerStateV1>(&bytes).is_err());
    }

    #[test]
    fn a_payers_row_whose_account_is_not_the_one_it_lists_is_refused() {
        let mut state = payer_with(&[("USD", 500)]);
        state.accounts[0].id = AccountId(99);
        let mut bytes = Vec::new();
        state.put_payer_and_lists(&mut Binary(&mut bytes));
        state.accounts[0].put(&mut Binary(&mut bytes));
        assert_eq!(
            decode::<PayerState>(&bytes),
            Err(DiskError(
                "a stored row does not decode: Inconsistent(\"a payer's account is not the one it lists\")"
                    .into()
            ))
        );
    }
}
