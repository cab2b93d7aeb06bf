//! Payments and refunds: money from a payer's wallet to a merchant, less the platform's fee,
//! and back.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Amount, Currency, Timestamp, TransferId};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId};
use crate::rooms::holds::{Hold, HoldStatus};

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Payment {
    pub id: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    pub fee: Amount,
    pub description: Option<String>,
    pub reference: Option<String>,
    pub created_at: Timestamp,
    /// What refunds have returned so far, and the part of it taken from the fee.
    pub amount_refunded: Amount,
    pub fee_refunded: Amount,
    /// For a payment authorized to be captured later: its hold as it stands. State, not part
    /// of the payment's stored form (`holds`); filled in when a payment is read. Boxed: few
    /// payments are holds, and the history in memory keeps every payment made since the last
    /// checkpoint (a hold in place is 112 bytes, a box 8).
    pub hold: Option<Box<Hold>>,
}

impl Payment {
    /// Whether money moved: a plain payment, or a hold that was captured.
    pub fn is_settled(&self) -> bool {
        self.hold
            .as_deref()
            .is_none_or(|hold| hold.status == HoldStatus::Captured)
    }

    /// What the merchant receives: the amount less the fee (never negative: the fee is capped
    /// at the amount).
    pub fn net(&self) -> Amount {
        self.amount
            .checked_sub(self.fee)
            .expect("the fee never exceeds the amount")
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Refund {
    pub id: RefundId,
    pub payment: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    /// The part of the refund taken back from the platform's fee.
    pub fee_refunded: Amount,
    pub created_at: Timestamp,
}

/// A payment to make: the same shape for a single payment and each item of a batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PayCommand {
    pub id: PaymentId,
    pub payer: PayerId,
    pub merchant: MerchantId,
    pub amount: Amount,
    pub currency: Currency,
    pub description: Option<String>,
    pub reference: Option<String>,
    /// Ledger ids for the merchant leg and the fee leg.
    pub transfer_ids: [TransferId; 2],
}

impl PayCommand {
    /// The largest id it names: its payment's and its transfers'.
    pub fn ids_max(&self) -> u128 {
        self.id
            .to_u128()
            .max(self.transfer_ids[0].0)
            .max(self.transfer_ids[1].0)
    }

    /// The payment this command makes at `now`, with `fee`, nothing refunded yet.
    pub fn made(&self, now: Timestamp, fee: Amount) -> Payment {
        Payment {
            id: self.id,
            payer: self.payer,
            merchant: self.merchant,
            amount: self.amount,
            currency: self.currency,
            fee,
            description: self.description.clone(),
            reference: self.reference.clone(),
            created_at: now,
            amount_refunded: Amount::ZERO,
            fee_refunded: Amount::ZERO,
            hold: None,
        }
    }
}

impl Fields for Payment {
    fn put(&self, out: &mut impl Put) {
        out.id("id", self.id.to_u128());
        out.id("payer", self.payer.to_u128());
        out.id("merchant", self.merchant.to_u128());
        out.int("amount", self.amount.micros());
        out.currency("currency", self.currency);
        out.int("fee", self.fee.micros());
        out.opt_text("description", self.description.as_deref());
        out.opt_text("reference", self.reference.as_deref());
        out.int("created_at", self.created_at.0);
        out.int("amount_refunded", self.amount_refunded.micros());
        out.int("fee_refunded", self.fee_refunded.micros());
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let payment = Payment {
            id: PaymentId::from_u128(input.id("id")?),
            payer: PayerId::from_u128(input.id("payer")?),
            merchant: MerchantId::from_u128(input.id("merchant")?),
            amount: Amount::from_micros(input.int("amount")?),
            currency: input.currency("currency")?,
            fee: Amount::from_micros(input.int("fee")?),
            description: input.opt_text("description")?,
            reference: input.opt_text("reference")?,
            created_at: Timestamp(input.int("created_at")?),
            amount_refunded: Amount::from_micros(input.int("amount_refunded")?),
            fee_refunded: Amount::from_micros(input.int("fee_refunded")?),
            hold: None,
        };
        Ok(payment)
    }
}

impl Fields for Refund {
    fn put(&self, out: &mut impl Put) {
        out.id("id", self.id.to_u128());
        out.id("payment", self.payment.to_u128());
        out.id("payer", self.payer.to_u128());
        out.id("merchant", self.merchant.to_u128());
        out.int("amount", self.amount.micros());
        out.currency("currency", self.currency);
        out.int("fee_refunded", self.fee_refunded.micros());
        out.int("created_at", self.created_at.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(Refund {
            id: RefundId::from_u128(input.id("id")?),
            payment: PaymentId::from_u128(input.id("payment")?),
            payer: PayerId::from_u128(input.id("payer")?),
            merchant: MerchantId::from_u128(input.id("merchant")?),
            amount: Amount::from_micros(input.int("amount")?),
            currency: input.currency("currency")?,
            fee_refunded: Amount::from_micros(input.int("fee_refunded")?),
            created_at: Timestamp(input.int("created_at")?),
        })
    }
}
