//! Statements: one line per top-up, payment and refund of a payer, with the running balance.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, Currency, Timestamp};

use crate::ids::{PayerId, PaymentId, RefundId, TopupId};

/// One line of a payer's statement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Entry {
    pub object: EntryObject,
    pub currency: Currency,
    /// `true` when money came into the wallet.
    pub credit: bool,
    pub amount: Amount,
    /// The wallet's posted balance in this currency after the entry.
    pub balance_after: Amount,
    pub created_at: Timestamp,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum EntryObject {
    Topup(TopupId),
    Payment(PaymentId),
    Refund(RefundId),
}

impl EntryObject {
    /// The stored form: a kind (1 top-up, 2 payment, 3 refund) and the object's id.
    pub fn put_fields(self, out: &mut impl Put) {
        let (kind, id) = match self {
            EntryObject::Topup(id) => (1, id.to_u128()),
            EntryObject::Payment(id) => (2, id.to_u128()),
            EntryObject::Refund(id) => (3, id.to_u128()),
        };
        out.code("object_kind", kind);
        out.id("object_id", id);
    }

    pub fn get_fields(input: &mut impl Get) -> Result<EntryObject, DecodeError> {
        let kind = input.code("object_kind")?;
        let id = input.id("object_id")?;
        Ok(match kind {
            1 => EntryObject::Topup(TopupId::from_u128(id)),
            2 => EntryObject::Payment(PaymentId::from_u128(id)),
            3 => EntryObject::Refund(RefundId::from_u128(id)),
            kind => return Err(DecodeError::UnknownTag(kind)),
        })
    }
}

/// A statement line as stored, with its payer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EntryRow {
    pub payer: PayerId,
    pub entry: Entry,
}

impl Fields for EntryRow {
    fn put(&self, out: &mut impl Put) {
        let entry = &self.entry;
        out.id("payer", self.payer.to_u128());
        entry.object.put_fields(out);
        out.currency("currency", entry.currency);
        out.flag("credit", entry.credit);
        out.int("amount", entry.amount.micros());
        out.int("balance_after", entry.balance_after.micros());
        out.int("created_at", entry.created_at.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let payer = PayerId::from_u128(input.id("payer")?);
        let object = EntryObject::get_fields(input)?;
        Ok(EntryRow {
            payer,
            entry: Entry {
                object,
                currency: input.currency("currency")?,
                credit: input.flag("credit")?,
                amount: Amount::from_micros(input.int("amount")?),
                balance_after: Amount::from_micros(input.int("balance_after")?),
                created_at: Timestamp(input.int("created_at")?),
            },
        })
    }
}
