//! Parties and keys: the operator, merchants and payers, and the API keys that name them.

use std::sync::Arc;

use farthing_kernel::{DecodeError, Fields, Get, Put, Slot, Table};
use farthing_ledger::{Amount, IdHashBuilder, Timestamp};

use crate::ids::{MerchantId, PayerId};
use crate::model::Rejection;
use crate::working_set::LoadError;

/// The SHA-256 digest of an API key. Keys themselves are never kept.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KeyHash(pub [u8; 32]);

/// Who is calling.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Principal {
    Operator,
    Merchant(MerchantId),
    Payer(PayerId),
}

/// A merchant's fee schedule: `floor(amount × bps / 10000) + fixed`, capped at the amount.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FeeSchedule {
    pub bps: u32,
    pub fixed: Amount,
}

/// Basis points in a whole: a fee above 100% is refused.
pub const FEE_BPS_MAX: u32 = 10_000;

impl FeeSchedule {
    pub const ZERO: FeeSchedule = FeeSchedule {
        bps: 0,
        fixed: Amount::ZERO,
    };

    /// The fee on `amount`, never more than the amount itself.
    pub fn fee_on(&self, amount: Amount) -> Amount {
        let proportional = amount
            .mul_div_floor(u64::from(self.bps), u64::from(FEE_BPS_MAX))
            .expect("bps is at most 10000, so the fee fits");
        let fee = proportional.checked_add(self.fixed).unwrap_or(Amount::MAX);
        fee.min(amount)
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Merchant {
    pub id: MerchantId,
    pub name: String,
    pub fee: FeeSchedule,
    pub created_at: Timestamp,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payer {
    pub id: PayerId,
    pub name: String,
    pub created_at: Timestamp,
}

/// A merchant as stored, with its key's hash.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct MerchantRow {
    pub merchant: Merchant,
    pub key_hash: KeyHash,
}

impl Fields for MerchantRow {
    fn put(&self, out: &mut impl Put) {
        let merchant = &self.merchant;
        out.id("id", merchant.id.to_u128());
        out.text("name", &merchant.name);
        out.digest("key_hash", &self.key_hash.0);
        out.word("fee_bps", merchant.fee.bps);
        out.wide("fee_fixed", merchant.fee.fixed.micros());
        out.int("created_at", merchant.created_at.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let id = MerchantId::from_u128(input.id("id")?);
        let name = input.text("name")?;
        let key_hash = KeyHash(input.digest("key_hash")?);
        // Rules are the state's to keep: an import that breaks one is read as it was written
        // and then refused whole.
        let bps = input.word("fee_bps")?;
        let fixed = Amount::from_micros(input.wide("fee_fixed")?);
        let created_at = Timestamp(input.int("created_at")?);
        Ok(MerchantRow {
            merchant: Merchant {
                id,
                name,
                fee: FeeSchedule { bps, fixed },
                created_at,
            },
            key_hash,
        })
    }
}

/// A payer as stored, with its key's hash.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PayerRow {
    pub payer: Payer,
    pub key_hash: KeyHash,
}

impl Fields for PayerRow {
    fn put(&self, out: &mut impl Put) {
        out.id("id", self.payer.id.to_u128());
        out.text("name", &self.payer.name);
        out.digest("key_hash", &self.key_hash.0);
        out.int("created_at", self.payer.created_at.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let id = PayerId::from_u128(input.id("id")?);
        let name = input.text("name")?;
        let key_hash = KeyHash(input.digest("key_hash")?);
        let created_at = Timestamp(input.int("created_at")?);
        Ok(PayerRow {
            payer: Payer {
                id,
                name,
                created_at,
            },
            key_hash,
        })
    }
}

impl Principal {
    /// The stored form: a kind (1 operator, 2 merchant, 3 payer) and an id (0 for the
    /// operator).
    pub fn put_fields(self, out: &mut impl Put, kind: &'static str, id: &'static str) {
        let (code, value) = self.code_and_id();
        out.code(kind, code);
        out.id(id, value);
    }

    /// The stored kind (1 operator, 2 merchant, 3 payer) and id (0 for the operator).
    pub fn code_and_id(self) -> (u8, u128) {
        match self {
            Principal::Operator => (1, 0),
            Principal::Merchant(merchant) => (2, merchant.to_u128()),
            Principal::Payer(payer) => (3, payer.to_u128()),
        }
    }

    pub fn get_fields(
        input: &mut impl Get,
        kind: &'static str,
        id: &'static str,
    ) -> Result<Principal, DecodeError> {
        let code = input.code(kind)?;
        let value = input.id(id)?;
        match (code, value) {
            (1, 0) => Ok(Principal::Operator),
            (2, value) => Ok(Principal::Merchant(MerchantId::from_u128(value))),
            (3, value) => Ok(Principal::Payer(PayerId::from_u128(value))),
            (code, _) => Err(DecodeError::UnknownTag(code)),
        }
    }
}

/// The parties and their keys: who an API key names.
#[derive(Default)]
pub(crate) struct Parties {
    operator_key: Option<KeyHash>,
    /// The operator key set since the changes were last taken, when tracking.
    operator_key_set: Option<KeyHash>,
    keys: Table<KeyHash, Principal>,
    /// Shared, so that a checkpoint takes a party's row without copying it.
    merchants: Table<MerchantId, Arc<Merchant>, IdHashBuilder>,
    payers: Table<PayerId, Arc<Payer>, IdHashBuilder>,
}

/// What changed among the parties since the changes were last taken.
pub(crate) struct PartyChanges {
    pub(crate) operator_key: Option<KeyHash>,
    pub(crate) keys: Vec<(KeyHash, Option<Principal>)>,
    pub(crate) merchants: Vec<Merchant>,
    pub(crate) payers: Vec<Payer>,
}

impl Parties {
    pub(crate) fn track_changes(&mut self) {
        self.keys.track_changes();
        self.merchants.track_changes();
        self.payers.track_changes();
    }

    pub(crate) fn operator_key(&self) -> Option<KeyHash> {
        self.operator_key
    }

    /// What memory knows of a key: whose it is, that it is no one's, or nothing (`None`).
    pub(crate) fn key_slot(&self, key_hash: &KeyHash) -> Option<Option<Principal>> {
        self.keys.slot(key_hash).map(|slot| match slot {
            Slot::Present(principal) => Some(*principal),
            Slot::Absent => None,
        })
    }

    pub(crate) fn key_taken(&self, key_hash: &KeyHash) -> bool {
        self.keys.contains(key_hash)
    }

    pub(crate) fn merchant(&self, id: MerchantId) -> Option<&Merchant> {
        self.merchants.get(&id).map(|merchant| &**merchant)
    }

    pub(crate) fn merchant_shared(&self, id: MerchantId) -> Option<Arc<Merchant>> {
        self.merchants.get(&id).cloned()
    }

    pub(crate) fn payer_shared(&self, id: PayerId) -> Option<Arc<Payer>> {
        self.payers.get(&id).cloned()
    }

    /// Whether memory holds the payer's record, without counting it as a use.
    pub(crate) fn holds_payer(&self, id: PayerId) -> bool {
        self.payers.holds(&id)
    }

    pub(crate) fn payer(&self, id: PayerId) -> Option<&Payer> {
        self.payers.get(&id).map(|payer| &**payer)
    }

    /// Makes `key_hash` the operator's key, in place of any other. A key held by a merchant
    /// or payer is never taken over.
    pub(crate) fn set_operator_key(&mut self, key_hash: KeyHash) -> Result<(), Rejection> {
        if matches!(self.keys.get(&key_hash), Some(p) if *p != Principal::Operator) {
            return Err(Rejection::IdCollision);
        }
        if let Some(old) = self.operator_key.replace(key_hash) {
            self.keys.remove(&old);
        }
        self.keys.put(key_hash, Principal::Operator);
        if self.keys.is_tracking_changes() {
            self.operator_key_set = Some(key_hash);
        }
        Ok(())
    }

    /// Adds a merchant with its key; both must be new.
    pub(crate) fn create_merchant(
        &mut self,
        merchant: Merchant,
        key_hash: KeyHash,
    ) -> Result<(), Rejection> {
        if self.merchants.contains(&merchant.id) || self.keys.contains(&key_hash) {
            return Err(Rejection::IdCollision);
        }
        self.keys.put(key_hash, Principal::Merchant(merchant.id));
        self.merchants.put(merchant.id, Arc::new(merchant));
        Ok(())
    }

    /// Adds a payer with its key; both must be new.
    pub(crate) fn create_payer(
        &mut self,
        payer: Payer,
        key_hash: KeyHash,
    ) -> Result<(), Rejection> {
        if self.payers.contains(&payer.id) || self.keys.contains(&key_hash) {
            return Err(Rejection::IdCollision);
        }
        self.keys.put(key_hash, Principal::Payer(payer.id));
        self.payers.put(payer.id, Arc::new(payer));
        Ok(())
    }

    /// Loads a stored key hash and whose it is. The operator's key is the operator key.
    pub(crate) fn load_key(
        &mut self,
        key_hash: KeyHash,
        principal: Principal,
    ) -> Result<(), LoadError> {
        if self.keys.slot(&key_hash).is_some()
            || (principal == Principal::Operator && self.operator_key.is_some())
        {
            return Err(LoadError::AlreadyLoaded);
        }
        if principal == Principal::Operator {
            self.operator_key = Some(key_hash);
        }
        let loaded = self.keys.load(key_hash, Slot::Present(principal));
        assert!(loaded, "the key was not held");
        Ok(())
    }

    pub(crate) fn load_merchant(&mut self, merchant: Arc<Merchant>) -> Result<(), LoadError> {
        if self.merchants.load(merchant.id, Slot::Present(merchant)) {
            Ok(())
        } else {
            Err(LoadError::AlreadyLoaded)
        }
    }

    pub(crate) fn load_payer(&mut self, payer: Arc<Payer>) -> Result<(), LoadError> {
        if self.payers.load(payer.id, Slot::Present(payer)) {
            Ok(())
        } else {
            Err(LoadError::AlreadyLoaded)
        }
    }

    /// Puts in an imported operator key (checked free beforehand).
    pub(crate) fn put_imported_operator_key(&mut self, key_hash: KeyHash) {
        self.operator_key = Some(key_hash);
        self.keys.put(key_hash, Principal::Operator);
        if self.keys.is_tracking_changes() {
            self.operator_key_set = Some(key_hash);
        }
    }

    /// Puts in an imported merchant and its key (checked free beforehand).
    pub(crate) fn put_imported_merchant(&mut self, merchant: &Merchant, key_hash: KeyHash) {
        self.keys.put(key_hash, Principal::Merchant(merchant.id));
        self.merchants.put(merchant.id, Arc::new(merchant.clone()));
    }

    /// Puts in an imported payer and its key (checked free beforehand).
    pub(crate) fn put_imported_payer(&mut self, payer: &Payer, key_hash: KeyHash) {
        self.keys.put(key_hash, Principal::Payer(payer.id));
        self.payers.put(payer.id, Arc::new(payer.clone()));
    }

    /// Forgets what has not changed since the changes were last taken (a cache whose disk
    /// holds it), but the operator's key and the parties `keep` names: in `shards` of each
    /// table only, and only what was not used in the last `unused_for` rounds
    /// ([`farthing_kernel::Table::forget_unchanged_in`]).
    pub(crate) fn forget_unchanged_in(
        &mut self,
        shards: std::ops::Range<usize>,
        unused_for: u32,
        keep_merchant: impl Fn(&MerchantId) -> bool,
        keep_payer: impl Fn(&PayerId) -> bool,
    ) {
        let operator_key = self.operator_key;
        self.keys
            .forget_unchanged_in(shards.clone(), unused_for, |key_hash| {
                Some(*key_hash) == operator_key
            });
        self.merchants
            .forget_unchanged_in(shards.clone(), unused_for, keep_merchant);
        self.payers
            .forget_unchanged_in(shards, unused_for, keep_payer);
    }

    pub(crate) fn merchant_changed(&self, id: &MerchantId) -> bool {
        self.merchants.is_changed(id)
    }

    pub(crate) fn payer_changed(&self, id: &PayerId) -> bool {
        self.payers.is_changed(id)
    }

    /// Rows held: keys, merchants and payers.
    pub(crate) fn rows_held(&self) -> usize {
        self.keys.keys_held() + self.merchants.keys_held() + self.payers.keys_held()
    }

    /// Every merchant and every payer with its key, each by id.
    pub(crate) fn with_keys(&self) -> (Vec<MerchantRow>, Vec<PayerRow>) {
        let mut merchants = Vec::with_capacity(self.merchants.len());
        let mut payers = Vec::with_capacity(self.payers.len());
        for (key_hash, principal) in self.keys.iter() {
            let key_hash = *key_hash;
            match principal {
                Principal::Operator => {}
                Principal::Merchant(id) => merchants.push(MerchantRow {
                    merchant: (**self.merchants.get(id).expect("a key's merchant")).clone(),
                    key_hash,
                }),
                Principal::Payer(id) => payers.push(PayerRow {
                    payer: (**self.payers.get(id).expect("a key's payer")).clone(),
                    key_hash,
                }),
            }
        }
        merchants.sort_unstable_by_key(|row| row.merchant.id);
        payers.sort_unstable_by_key(|row| row.payer.id);
        (merchants, payers)
    }

    /// What changed since the changes were last taken: the operator key set last, every key
    /// hash whose principal changed (by hash, `None` where it no longer maps), and the new
    /// merchants and payers in the order made.
    pub(crate) fn take_changes(&mut self) -> PartyChanges {
        let mut keys: Vec<(KeyHash, Option<Principal>)> = self
            .keys
            .take_changes()
            .into_iter()
            .map(|(key_hash, slot)| match slot {
                Slot::Present(principal) => (key_hash, Some(*principal)),
                Slot::Absent => (key_hash, None),
            })
            .collect();
        keys.sort_unstable_by_key(|(key_hash, _)| *key_hash);
        let merchants = self
            .merchants
            .take_changes()
            .into_iter()
            .map(|(_, slot)| match slot {
                Slot::Present(merchant) => (**merchant).clone(),
                Slot::Absent => unreachable!("merchants are never removed"),
            })
            .collect();
        let payers = self
            .payers
            .take_changes()
            .into_iter()
            .map(|(_, slot)| match slot {
                Slot::Present(payer) => (**payer).clone(),
                Slot::Absent => unreachable!("payers are never removed"),
            })
            .collect();
        PartyChanges {
            operator_key: self.operator_key_set.take(),
            keys,
            merchants,
            payers,
        }
    }
}
