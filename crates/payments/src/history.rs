//! History: payments, top-ups and refunds with their places in the lists and statements that
//! show them. Rows are written once and never changed (what changes after, a payment's refund
//! totals, is state), so a store can keep old rows on disk and only new ones in memory.
//!
//! A state holds history rows in up to three generations: the young one (made since the last
//! checkpoint began), the frozen one (being written by a checkpoint, still read from memory
//! until it is on disk) and the loaded one (rows read back from disk, for a refund or a reused
//! id). A whole state never checkpoints, so its young generation holds everything.

use std::collections::HashMap;

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, IdHashBuilder, IdMax, TransferRecords};

use crate::ids::{PaymentId, RefundId, TopupId};
use crate::model::*;

/// A payment with the payment made before it in each list that shows it. Lists are chains
/// walked from their newest item: nothing about a list grows but its items, so a store can
/// keep old items on disk and the rest of a list needs no index.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PaymentRow {
    /// The payment as made (an imported one with the refund totals it came with); refunds
    /// made since are in the state.
    pub payment: Payment,
    /// The payer's payment before this one.
    pub previous_of_payer: Option<PaymentId>,
    /// The merchant's payment before this one.
    pub previous_of_merchant: Option<PaymentId>,
    /// The payment made before this one, of any party (the operator's list).
    pub previous: Option<PaymentId>,
    pub line: Option<Line>,
}

/// A statement line, kept with the object it shows (a top-up, payment or refund, which give
/// the rest of the line): the payer's posted balance after it, and the payer's line before it.
/// Every object made here has one; an import brings it as an item of its own, after the
/// object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Line {
    pub balance_after: Amount,
    pub previous: Option<EntryObject>,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TopupRow {
    pub topup: Topup,
    pub line: Option<Line>,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RefundRow {
    pub refund: Refund,
    pub line: Option<Line>,
}

/// A payment's refund totals, once a refund has changed them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Refunded {
    pub amount_refunded: Amount,
    pub fee_refunded: Amount,
}

/// History rows of one age.
#[derive(Default)]
pub(crate) struct Generation {
    pub(crate) payments: Vec<PaymentRow>,
    /// Where each payment's row is. Rows live in one growing vector and the map holds only
    /// their positions: inserting into a hash table of large rows touches a random page per
    /// insert, which cost more than all the rest of a payment.
    pub(crate) payment_index: HashMap<PaymentId, usize, IdHashBuilder>,
    pub(crate) topups: HashMap<TopupId, TopupRow, IdHashBuilder>,
    pub(crate) refunds: HashMap<RefundId, RefundRow, IdHashBuilder>,
    /// Statement lines an import brought for objects of an older generation.
    pub(crate) lines: HashMap<EntryObject, Line>,
    /// The ledger's transfer records of this generation (frozen only: the young ones are in
    /// the ledger).
    pub(crate) transfers: TransferRecords,
    /// No row of this generation has a larger id (set when it is frozen).
    pub(crate) id_max: u128,
    /// No payment here has a larger id: a new id, above it, is known absent without a look
    /// into the index.
    payment_id_max: IdMax,
}

impl Generation {
    pub(crate) fn payment(&self, id: PaymentId) -> Option<&PaymentRow> {
        if !self.payment_id_max.may_hold(id.to_u128()) {
            return None;
        }
        self.payment_index
            .get(&id)
            .map(|&index| &self.payments[index])
    }

    pub(crate) fn push_payment(&mut self, row: PaymentRow) {
        self.payment_id_max.note(row.payment.id.to_u128());
        let earlier = self
            .payment_index
            .insert(row.payment.id, self.payments.len());
        assert!(earlier.is_none(), "a payment id is used once");
        self.payments.push(row);
    }

    /// The line of `object`, if this generation holds the object with its line, or a line
    /// an import brought for it.
    pub(crate) fn line(&self, object: EntryObject) -> Option<Line> {
        let kept = match object {
            EntryObject::Payment(id) => self.payment(id).and_then(|row| row.line),
            EntryObject::Topup(id) => self.topups.get(&id).and_then(|row| row.line),
            EntryObject::Refund(id) => self.refunds.get(&id).and_then(|row| row.line),
        };
        kept.or_else(|| self.lines.get(&object).copied())
    }

    /// Rows held, each counted once (a payment's transfer records included).
    pub(crate) fn rows(&self) -> usize {
        self.payments.len()
            + self.topups.len()
            + self.refunds.len()
            + self.lines.len()
            + self.transfers.len()
    }
}

impl Fields for Line {
    fn put(&self, out: &mut impl Put) {
        out.int("balance_after", self.balance_after.micros());
        match self.previous {
            Some(object) => {
                out.flag("has_previous", true);
                object.put_fields(out);
            }
            None => out.flag("has_previous", false),
        }
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let balance_after = Amount::from_micros(input.int("balance_after")?);
        let previous = if input.flag("has_previous")? {
            Some(EntryObject::get_fields(input)?)
        } else {
            None
        };
        Ok(Line {
            balance_after,
            previous,
        })
    }
}

fn put_line(out: &mut impl Put, line: &Option<Line>) {
    out.flag("has_line", line.is_some());
    if let Some(line) = line {
        line.put(out);
    }
}

fn get_line(input: &mut impl Get) -> Result<Option<Line>, DecodeError> {
    if input.flag("has_line")? {
        Ok(Some(Line::get(input)?))
    } else {
        Ok(None)
    }
}

impl Fields for PaymentRow {
    fn put(&self, out: &mut impl Put) {
        self.payment.put(out);
        out.opt_id(
            "previous_of_payer",
            self.previous_of_payer.map(PaymentId::to_u128),
        );
        out.opt_id(
            "previous_of_merchant",
            self.previous_of_merchant.map(PaymentId::to_u128),
        );
        out.opt_id("previous", self.previous.map(PaymentId::to_u128));
        put_line(out, &self.line);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(PaymentRow {
            payment: Payment::get(input)?,
            previous_of_payer: input.opt_id("previous_of_payer")?.map(PaymentId::from_u128),
            previous_of_merchant: input
                .opt_id("previous_of_merchant")?
                .map(PaymentId::from_u128),
            previous: input.opt_id("previous")?.map(PaymentId::from_u128),
            line: get_line(input)?,
        })
    }
}

impl Fields for TopupRow {
    fn put(&self, out: &mut impl Put) {
        self.topup.put(out);
        put_line(out, &self.line);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(TopupRow {
            topup: Topup::get(input)?,
            line: get_line(input)?,
        })
    }
}

impl Fields for RefundRow {
    fn put(&self, out: &mut impl Put) {
        self.refund.put(out);
        put_line(out, &self.line);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(RefundRow {
            refund: Refund::get(input)?,
            line: get_line(input)?,
        })
    }
}

impl Fields for Refunded {
    fn put(&self, out: &mut impl Put) {
        out.int("amount_refunded", self.amount_refunded.micros());
        out.int("fee_refunded", self.fee_refunded.micros());
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(Refunded {
            amount_refunded: Amount::from_micros(input.int("amount_refunded")?),
            fee_refunded: Amount::from_micros(input.int("fee_refunded")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{MerchantId, PayerId};
    use farthing_ledger::{Currency, Timestamp};

    fn row(id: u128) -> PaymentRow {
        PaymentRow {
            payment: Payment {
                id: PaymentId::from_u128(id),
                payer: PayerId::from_u128(7),
                merchant: MerchantId::from_u128(8),
                amount: Amount::from_micros(100),
                currency: Currency::parse("USD").unwrap(),
                fee: Amount::ZERO,
                description: None,
                reference: None,
                created_at: Timestamp(id as u64),
                amount_refunded: Amount::ZERO,
                fee_refunded: Amount::ZERO,
                hold: None,
            },
            previous_of_payer: None,
            previous_of_merchant: None,
            previous: None,
            line: None,
        }
    }

    #[test]
    fn a_generation_finds_its_payments_in_any_order_and_no_id_above_the_largest() {
        let mut generation = Generation::default();
        assert_eq!(generation.payment(PaymentId::from_u128(0)), None);
        for id in [50, 20, 30] {
            generation.push_payment(row(id));
        }
        for id in [20, 30, 50] {
            assert_eq!(generation.payment(PaymentId::from_u128(id)), Some(&row(id)));
        }
        for id in [0, 10, 25, 51, u128::MAX] {
            assert_eq!(generation.payment(PaymentId::from_u128(id)), None);
        }
    }
}
