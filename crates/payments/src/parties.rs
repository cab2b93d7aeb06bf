//! Parties and keys: the operator, merchants and payers, and the API keys that name them.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, Timestamp};

use crate::ids::{MerchantId, PayerId};

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
        let (code, value) = match self {
            Principal::Operator => (1, 0),
            Principal::Merchant(merchant) => (2, merchant.to_u128()),
            Principal::Payer(payer) => (3, payer.to_u128()),
        };
        out.code(kind, code);
        out.id(id, value);
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
