//! The journal's binary form of a [`Record`], and the stored form of an [`Outcome`] (an
//! idempotency key's first answer): little-endian, length-prefixed, each versioned on its own.
//!
//! Hand-written rather than derived so that the format is explicit, stable across library
//! upgrades, and cheap: encoding a payment takes a few dozen byte copies.

use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, Currency, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord,
};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;
use farthing_kernel::{Binary, BinaryReader, Fields, Get, Put};

/// The first byte of every encoded record. Version 2 writes an import's items in their stored
/// form (each kind's [`Fields`] description, as checkpoints and PostgreSQL rows use it);
/// version 1 records, which wrote them by hand, still read.
const FORMAT_VERSION: u8 = 2;
const FORMAT_VERSION_FIRST: u8 = 1;

/// The first byte of every encoded outcome. Outcomes change apart from records, so they
/// carry their own version.
const OUTCOME_FORMAT_VERSION: u8 = 1;

pub use farthing_kernel::DecodeError;
use farthing_kernel::hold_state_of;
pub use farthing_kernel::{transfer_rejection_of, transfer_rejection_tag};

/// Appends the encoding of `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.u8(FORMAT_VERSION);
    w.u64(record.now.0);
    match &record.idempotency {
        None => w.u8(0),
        Some(claim) => {
            w.u8(1);
            w.principal(claim.key.principal);
            w.text(&claim.key.key);
            w.bytes32(&claim.fingerprint);
        }
    }
    match &record.command {
        Command::SetOperatorKey { key_hash } => {
            w.u8(1);
            w.bytes32(&key_hash.0);
        }
        Command::CreateMerchant {
            id,
            name,
            key_hash,
            fee,
        } => {
            w.u8(2);
            w.u128(id.to_u128());
            w.text(name);
            w.bytes32(&key_hash.0);
            w.u32(fee.bps);
            w.u64(fee.fixed.micros());
        }
        Command::CreatePayer { id, name, key_hash } => {
            w.u8(3);
            w.u128(id.to_u128());
            w.text(name);
            w.bytes32(&key_hash.0);
        }
        Command::Topup {
            id,
            payer,
            amount,
            currency,
            source,
            transfer_id,
        } => {
            w.u8(4);
            w.u128(id.to_u128());
            w.u128(payer.to_u128());
            w.u64(amount.micros());
            w.u32(currency.to_u32());
            w.funding_source(*source);
            w.u128(transfer_id.0);
        }
        Command::Pay(pay) => {
            w.u8(5);
            w.pay(pay);
        }
        Command::PayBatch(items) => {
            w.u8(6);
            w.u32(u32::try_from(items.len()).expect("batches are bounded"));
            for pay in items {
                w.pay(pay);
            }
        }
        Command::Refund {
            id,
            payment,
            amount,
            caller,
            transfer_ids,
        } => {
            w.u8(7);
            w.u128(id.to_u128());
            w.u128(payment.to_u128());
            w.opt_amount(*amount);
            w.principal(*caller);
            w.u128(transfer_ids[0].0);
            w.u128(transfer_ids[1].0);
        }
        Command::PruneIdempotencyKeys { before } => {
            w.u8(8);
            w.u64(before.0);
        }
        Command::Room(command) => command.encode(&mut w),
        Command::Import(items) => {
            w.u8(9);
            w.u32(u32::try_from(items.len()).expect("imports are chunked"));
            for item in items {
                w.imported(item);
            }
        }
    }
}

/// Decodes one whole record from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != FORMAT_VERSION && version != FORMAT_VERSION_FIRST {
        return Err(DecodeError::UnknownVersion(version));
    }
    let now = Timestamp(r.u64()?);
    let idempotency = match r.u8()? {
        0 => None,
        1 => Some(IdempotencyClaim {
            key: IdempotencyKey {
                principal: r.principal()?,
                key: r.text()?,
            },
            fingerprint: r.bytes32()?,
        }),
        tag => return Err(DecodeError::UnknownTag(tag)),
    };
    let command = match r.u8()? {
        1 => Command::SetOperatorKey {
            key_hash: KeyHash(r.bytes32()?),
        },
        2 => Command::CreateMerchant {
            id: MerchantId::from_u128(r.u128()?),
            name: r.text()?,
            key_hash: KeyHash(r.bytes32()?),
            fee: FeeSchedule {
                bps: r.u32()?,
                fixed: Amount::from_micros(r.u64()?),
            },
        },
        3 => Command::CreatePayer {
            id: PayerId::from_u128(r.u128()?),
            name: r.text()?,
            key_hash: KeyHash(r.bytes32()?),
        },
        4 => Command::Topup {
            id: TopupId::from_u128(r.u128()?),
            payer: PayerId::from_u128(r.u128()?),
            amount: Amount::from_micros(r.u64()?),
            currency: r.currency()?,
            source: r.funding_source()?,
            transfer_id: TransferId(r.u128()?),
        },
        5 => Command::Pay(r.pay()?),
        6 => {
            let count = r.u32()? as usize;
            // Each item takes at least 90 bytes: a corrupt count cannot make us allocate more
            // than the record could hold.
            let mut items = Vec::with_capacity(count.min(r.0.len() / 90 + 1));
            for _ in 0..count {
                items.push(r.pay()?);
            }
            Command::PayBatch(items)
        }
        7 => Command::Refund {
            id: RefundId::from_u128(r.u128()?),
            payment: PaymentId::from_u128(r.u128()?),
            // "The rest" and an explicit amount (even zero) must stay apart: a zero refund is
            // refused, and replay must refuse it again rather than refund everything.
            amount: r.opt_amount()?,
            caller: r.principal()?,
            transfer_ids: [TransferId(r.u128()?), TransferId(r.u128()?)],
        },
        8 => Command::PruneIdempotencyKeys {
            before: Timestamp(r.u64()?),
        },
        9 => {
            let count = r.u32()? as usize;
            // Each item takes at least 33 bytes: a corrupt count cannot make us allocate more
            // than the record could hold.
            let mut items = Vec::with_capacity(count.min(r.0.len() / 33 + 1));
            for _ in 0..count {
                items.push(if version == FORMAT_VERSION_FIRST {
                    r.imported_first()?
                } else {
                    r.imported()?
                });
            }
            Command::Import(items)
        }
        tag => match RoomCommand::decode(tag, &mut r) {
            Some(command) => Command::Room(command?),
            None => return Err(DecodeError::UnknownTag(tag)),
        },
    };
    if !r.0.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(Record {
        now,
        idempotency,
        command,
    })
}

/// Appends the encoding of `outcome` to `out`.
///
/// Every variant, every [`BatchItemOutcome`] and every [`Rejection`] has an explicit tag that
/// never changes meaning: stored outcomes are read back long after they were written.
pub fn encode_outcome(outcome: &Outcome, out: &mut Vec<u8>) {
    let mut w = Writer(out);
    w.u8(OUTCOME_FORMAT_VERSION);
    match outcome {
        Outcome::OperatorKeySet => w.u8(1),
        Outcome::MerchantCreated(merchant) => {
            w.u8(2);
            w.u128(merchant.id.to_u128());
            w.text(&merchant.name);
            w.u32(merchant.fee.bps);
            w.u64(merchant.fee.fixed.micros());
            w.u64(merchant.created_at.0);
        }
        Outcome::PayerCreated(payer) => {
            w.u8(3);
            w.u128(payer.id.to_u128());
            w.text(&payer.name);
            w.u64(payer.created_at.0);
        }
        Outcome::ToppedUp(topup) => {
            w.u8(4);
            w.u128(topup.id.to_u128());
            w.u128(topup.payer.to_u128());
            w.u64(topup.amount.micros());
            w.u32(topup.currency.to_u32());
            w.funding_source(topup.source);
            w.u64(topup.created_at.0);
        }
        Outcome::Paid(payment) => {
            w.u8(5);
            w.paid(payment);
        }
        Outcome::PaidBatch(items) => {
            w.u8(6);
            w.u32(u32::try_from(items.len()).expect("batches are bounded"));
            for item in items {
                match item {
                    BatchItemOutcome::Succeeded(id) => {
                        w.u8(1);
                        w.u128(id.to_u128());
                    }
                    BatchItemOutcome::Failed(rejection) => {
                        w.u8(2);
                        w.rejection(*rejection);
                    }
                }
            }
        }
        Outcome::Refunded(refund) => {
            w.u8(7);
            w.u128(refund.id.to_u128());
            w.u128(refund.payment.to_u128());
            w.u128(refund.payer.to_u128());
            w.u128(refund.merchant.to_u128());
            w.u64(refund.amount.micros());
            w.u32(refund.currency.to_u32());
            w.u64(refund.fee_refunded.micros());
            w.u64(refund.created_at.0);
        }
        Outcome::Pruned => w.u8(8),
        Outcome::Rejected(rejection) => {
            w.u8(9);
            w.rejection(*rejection);
        }
        Outcome::Imported { count } => {
            w.u8(10);
            w.u64(u64::try_from(*count).expect("a usize fits in 64 bits"));
        }
        Outcome::Room(outcome) => outcome.encode(&mut w),
    }
}

/// Decodes one whole outcome from `bytes`.
pub fn decode_outcome(bytes: &[u8]) -> Result<Outcome, DecodeError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != OUTCOME_FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let outcome = match r.u8()? {
        1 => Outcome::OperatorKeySet,
        2 => Outcome::MerchantCreated(Merchant {
            id: MerchantId::from_u128(r.u128()?),
            name: r.text()?,
            fee: FeeSchedule {
                bps: r.u32()?,
                fixed: Amount::from_micros(r.u64()?),
            },
            created_at: Timestamp(r.u64()?),
        }),
        3 => Outcome::PayerCreated(Payer {
            id: PayerId::from_u128(r.u128()?),
            name: r.text()?,
            created_at: Timestamp(r.u64()?),
        }),
        4 => Outcome::ToppedUp(Topup {
            id: TopupId::from_u128(r.u128()?),
            payer: PayerId::from_u128(r.u128()?),
            amount: Amount::from_micros(r.u64()?),
            currency: r.currency()?,
            source: r.funding_source()?,
            created_at: Timestamp(r.u64()?),
        }),
        5 => Outcome::Paid(r.paid()?),
        6 => {
            let count = r.u32()? as usize;
            // Each item takes at least 2 bytes: a corrupt count cannot make us allocate more
            // than the bytes could hold.
            let mut items = Vec::with_capacity(count.min(r.0.len() / 2));
            for _ in 0..count {
                items.push(match r.u8()? {
                    1 => BatchItemOutcome::Succeeded(PaymentId::from_u128(r.u128()?)),
                    2 => BatchItemOutcome::Failed(r.rejection()?),
                    tag => return Err(DecodeError::UnknownTag(tag)),
                });
            }
            Outcome::PaidBatch(items)
        }
        7 => Outcome::Refunded(Refund {
            id: RefundId::from_u128(r.u128()?),
            payment: PaymentId::from_u128(r.u128()?),
            payer: PayerId::from_u128(r.u128()?),
            merchant: MerchantId::from_u128(r.u128()?),
            amount: Amount::from_micros(r.u64()?),
            currency: r.currency()?,
            fee_refunded: Amount::from_micros(r.u64()?),
            created_at: Timestamp(r.u64()?),
        }),
        8 => Outcome::Pruned,
        9 => Outcome::Rejected(r.rejection()?),
        10 => Outcome::Imported {
            count: usize::try_from(r.u64()?).map_err(|_| DecodeError::OutOfRange)?,
        },
        tag => match RoomOutcome::decode(tag, &mut r) {
            Some(outcome) => Outcome::Room(outcome?),
            None => return Err(DecodeError::UnknownTag(tag)),
        },
    };
    if !r.0.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(outcome)
}

/// Writes the journal's primitives: what a room's commands and outcomes are written with.
pub struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    /// The kernel's binary form, which every primitive here is written in.
    pub(crate) fn bin(&mut self) -> Binary<'_> {
        Binary(self.0)
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.bin().u8(v);
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.bin().u32(v);
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.bin().u64(v);
    }
    pub(crate) fn u128(&mut self, v: u128) {
        self.bin().u128(v);
    }
    pub(crate) fn bytes32(&mut self, v: &[u8; 32]) {
        self.bin().digest("", v);
    }
    pub(crate) fn text(&mut self, v: &str) {
        self.bin().text("", v);
    }
    pub(crate) fn opt_text(&mut self, v: &Option<String>) {
        self.bin().opt_text("", v.as_deref());
    }
    pub(crate) fn principal(&mut self, p: Principal) {
        match p {
            Principal::Operator => self.u8(1),
            Principal::Merchant(id) => {
                self.u8(2);
                self.u128(id.to_u128());
            }
            Principal::Payer(id) => {
                self.u8(3);
                self.u128(id.to_u128());
            }
        }
    }
    pub(crate) fn funding_source(&mut self, source: FundingSource) {
        self.u8(match source {
            FundingSource::Sandbox => 1,
            FundingSource::SandboxDecline => 2,
        });
    }
    /// Stable tags, one per variant: a stored tag never changes meaning, and a new variant
    /// takes a new tag (this match has no catch-all, so it cannot be forgotten).
    pub(crate) fn rejection(&mut self, rejection: Rejection) {
        self.u8(match rejection {
            Rejection::PayerNotFound => 1,
            Rejection::MerchantNotFound => 2,
            Rejection::PaymentNotFound => 3,
            Rejection::InsufficientFunds => 4,
            Rejection::FundingDeclined => 5,
            Rejection::RefundExceedsPayment => 6,
            Rejection::MerchantBalanceInsufficient => 7,
            Rejection::AmountTooLarge => 8,
            Rejection::AmountNotPositive => 9,
            Rejection::IdempotencyKeyReused => 10,
            Rejection::IdCollision => 11,
            Rejection::ImportDoesNotFit => 12,
            Rejection::Room(rejection) => rejection.tag(),
        });
    }
    pub(crate) fn imported(&mut self, item: &Imported) {
        let mut out = Binary(self.0);
        match item {
            Imported::OperatorKey(key_hash) => {
                out.u8(1);
                out.digest("key_hash", &key_hash.0);
            }
            Imported::Merchant { merchant, key_hash } => {
                out.u8(2);
                MerchantRow {
                    merchant: merchant.clone(),
                    key_hash: *key_hash,
                }
                .put(&mut out);
            }
            Imported::Payer { payer, key_hash } => {
                out.u8(3);
                PayerRow {
                    payer: payer.clone(),
                    key_hash: *key_hash,
                }
                .put(&mut out);
            }
            Imported::Account { owner, account } => {
                out.u8(4);
                AccountRow {
                    owner: *owner,
                    account: *account,
                }
                .put(&mut out);
            }
            Imported::Transfer(record) => {
                out.u8(5);
                record.put(&mut out);
            }
            Imported::Payment(payment) => {
                out.u8(6);
                payment.put(&mut out);
            }
            Imported::Topup(topup) => {
                out.u8(7);
                topup.put(&mut out);
            }
            Imported::Refund(refund) => {
                out.u8(8);
                refund.put(&mut out);
            }
            Imported::Entry { payer, entry } => {
                out.u8(9);
                EntryRow {
                    payer: *payer,
                    entry: *entry,
                }
                .put(&mut out);
            }
            Imported::Idempotency(row) => {
                out.u8(10);
                row.put(&mut out);
            }
            Imported::Row(row) => {
                // The kind's tag, then the row's own binary form.
                out.u8(11);
                out.u8(row.tag);
                out.0.extend_from_slice(&row.bytes);
            }
        }
    }
    /// An optional amount ("the rest" or "all of it" when absent): absent and zero stay apart.
    pub(crate) fn opt_amount(&mut self, amount: Option<Amount>) {
        match amount {
            None => self.u8(0),
            Some(amount) => {
                self.u8(1);
                self.u64(amount.micros());
            }
        }
    }
    pub(crate) fn paid(&mut self, payment: &Payment) {
        self.u128(payment.id.to_u128());
        self.u128(payment.payer.to_u128());
        self.u128(payment.merchant.to_u128());
        self.u64(payment.amount.micros());
        self.u32(payment.currency.to_u32());
        self.u64(payment.fee.micros());
        self.opt_text(&payment.description);
        self.opt_text(&payment.reference);
        self.u64(payment.created_at.0);
        self.u64(payment.amount_refunded.micros());
        self.u64(payment.fee_refunded.micros());
    }
    pub(crate) fn pay(&mut self, pay: &PayCommand) {
        self.u128(pay.id.to_u128());
        self.u128(pay.payer.to_u128());
        self.u128(pay.merchant.to_u128());
        self.u64(pay.amount.micros());
        self.u32(pay.currency.to_u32());
        self.opt_text(&pay.description);
        self.opt_text(&pay.reference);
        self.u128(pay.transfer_ids[0].0);
        self.u128(pay.transfer_ids[1].0);
    }
}

/// Reads what [`Writer`] wrote.
pub struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    /// Reads with the kernel's binary form, then goes on after what it read.
    pub(crate) fn with<T>(
        &mut self,
        read: impl FnOnce(&mut BinaryReader<'a>) -> Result<T, DecodeError>,
    ) -> Result<T, DecodeError> {
        let mut input = BinaryReader(self.0);
        let value = read(&mut input)?;
        self.0 = input.0;
        Ok(value)
    }
    pub(crate) fn opt_amount(&mut self) -> Result<Option<Amount>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(Amount::from_micros(self.u64()?))),
            tag => Err(DecodeError::UnknownTag(tag)),
        }
    }
    pub(crate) fn paid(&mut self) -> Result<Payment, DecodeError> {
        Ok(Payment {
            id: PaymentId::from_u128(self.u128()?),
            payer: PayerId::from_u128(self.u128()?),
            merchant: MerchantId::from_u128(self.u128()?),
            amount: Amount::from_micros(self.u64()?),
            currency: self.currency()?,
            fee: Amount::from_micros(self.u64()?),
            description: self.opt_text()?,
            reference: self.opt_text()?,
            created_at: Timestamp(self.u64()?),
            amount_refunded: Amount::from_micros(self.u64()?),
            fee_refunded: Amount::from_micros(self.u64()?),
            hold: None,
        })
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.with(|r| r.u8())
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.with(|r| r.u32())
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.with(|r| r.u64())
    }
    pub(crate) fn u128(&mut self) -> Result<u128, DecodeError> {
        self.with(|r| r.u128())
    }
    pub(crate) fn bytes32(&mut self) -> Result<[u8; 32], DecodeError> {
        self.with(|r| r.digest(""))
    }
    pub(crate) fn text(&mut self) -> Result<String, DecodeError> {
        self.with(|r| r.text(""))
    }
    pub(crate) fn opt_text(&mut self) -> Result<Option<String>, DecodeError> {
        self.with(|r| r.opt_text(""))
    }
    pub(crate) fn currency(&mut self) -> Result<Currency, DecodeError> {
        self.with(|r| r.currency(""))
    }
    pub(crate) fn funding_source(&mut self) -> Result<FundingSource, DecodeError> {
        Ok(match self.u8()? {
            1 => FundingSource::Sandbox,
            2 => FundingSource::SandboxDecline,
            tag => return Err(DecodeError::UnknownTag(tag)),
        })
    }
    pub(crate) fn rejection(&mut self) -> Result<Rejection, DecodeError> {
        Ok(match self.u8()? {
            1 => Rejection::PayerNotFound,
            2 => Rejection::MerchantNotFound,
            3 => Rejection::PaymentNotFound,
            4 => Rejection::InsufficientFunds,
            5 => Rejection::FundingDeclined,
            6 => Rejection::RefundExceedsPayment,
            7 => Rejection::MerchantBalanceInsufficient,
            8 => Rejection::AmountTooLarge,
            9 => Rejection::AmountNotPositive,
            10 => Rejection::IdempotencyKeyReused,
            11 => Rejection::IdCollision,
            12 => Rejection::ImportDoesNotFit,
            tag => match RoomRejection::of_tag(tag) {
                Some(rejection) => Rejection::Room(rejection),
                None => return Err(DecodeError::UnknownTag(tag)),
            },
        })
    }
    pub(crate) fn principal(&mut self) -> Result<Principal, DecodeError> {
        Ok(match self.u8()? {
            1 => Principal::Operator,
            2 => Principal::Merchant(MerchantId::from_u128(self.u128()?)),
            3 => Principal::Payer(PayerId::from_u128(self.u128()?)),
            tag => return Err(DecodeError::UnknownTag(tag)),
        })
    }
    pub(crate) fn bool(&mut self) -> Result<bool, DecodeError> {
        self.with(|r| r.flag(""))
    }
    pub(crate) fn opt_u64(&mut self) -> Result<Option<u64>, DecodeError> {
        self.with(|r| r.opt_int(""))
    }
    /// An owner as version 1 wrote it: its kind ([`Owner::parts`]), then its id only for a
    /// payer (1) or a merchant (2). Later versions write both parts always (`Owner::put_fields`).
    pub(crate) fn owner(&mut self) -> Result<Owner, DecodeError> {
        let kind = self.u8()?;
        let id = if matches!(kind, 1 | 2) {
            self.u128()?
        } else {
            0
        };
        Owner::from_parts(kind, id)
    }
    pub(crate) fn transfer_record(&mut self) -> Result<TransferRecord, DecodeError> {
        let id = TransferId(self.u128()?);
        let debit = AccountId(self.u64()?);
        let credit = AccountId(self.u64()?);
        let amount = Amount::from_micros(self.u64()?);
        let kind = match self.u8()? {
            1 => TransferKind::Posted,
            2 => TransferKind::Pending {
                timeout_secs: self.u32()?,
            },
            3 => TransferKind::PostPending {
                pending_id: TransferId(self.u128()?),
            },
            4 => TransferKind::VoidPending {
                pending_id: TransferId(self.u128()?),
            },
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        let linked = self.bool()?;
        let timestamp = Timestamp(self.u64()?);
        let outcome = match self.u8()? {
            0 => Ok(()),
            tag => Err(transfer_rejection_of(tag).ok_or(DecodeError::UnknownTag(tag))?),
        };
        let hold = hold_state_of(self.u8()?)?;
        let expires_at = self.opt_u64()?.map(Timestamp);
        Ok(TransferRecord {
            transfer: Transfer {
                id,
                debit,
                credit,
                amount,
                kind,
                linked,
            },
            timestamp,
            outcome,
            hold,
            expires_at,
        })
    }
    /// An import's item as version 2 writes it.
    pub(crate) fn imported(&mut self) -> Result<Imported, DecodeError> {
        let tag = self.u8()?;
        let mut input = BinaryReader(self.0);
        let item = match tag {
            1 => Imported::OperatorKey(KeyHash(input.digest("key_hash")?)),
            2 => {
                let row = MerchantRow::get(&mut input)?;
                Imported::Merchant {
                    merchant: row.merchant,
                    key_hash: row.key_hash,
                }
            }
            3 => {
                let row = PayerRow::get(&mut input)?;
                Imported::Payer {
                    payer: row.payer,
                    key_hash: row.key_hash,
                }
            }
            4 => {
                let row = AccountRow::get(&mut input)?;
                Imported::Account {
                    owner: row.owner,
                    account: row.account,
                }
            }
            5 => Imported::Transfer(TransferRecord::get(&mut input)?),
            6 => Imported::Payment(Payment::get(&mut input)?),
            7 => Imported::Topup(Topup::get(&mut input)?),
            8 => Imported::Refund(Refund::get(&mut input)?),
            9 => {
                let row = EntryRow::get(&mut input)?;
                Imported::Entry {
                    payer: row.payer,
                    entry: row.entry,
                }
            }
            10 => Imported::Idempotency(IdempotencyRow::get(&mut input)?),
            11 => {
                let tag = input.u8()?;
                let info =
                    crate::kinds::KindInfo::of_tag(tag).ok_or(DecodeError::UnknownTag(tag))?;
                let (id, bytes) = (info.get)(&mut input)?;
                Imported::Row(StoredRow { tag, id, bytes })
            }
            tag => return Err(DecodeError::UnknownTag(tag)),
        };
        self.0 = input.0;
        Ok(item)
    }

    /// An import's item as version 1 wrote it, field by field.
    pub(crate) fn imported_first(&mut self) -> Result<Imported, DecodeError> {
        Ok(match self.u8()? {
            1 => Imported::OperatorKey(KeyHash(self.bytes32()?)),
            2 => {
                let id = MerchantId::from_u128(self.u128()?);
                let name = self.text()?;
                let key_hash = KeyHash(self.bytes32()?);
                Imported::Merchant {
                    merchant: Merchant {
                        id,
                        name,
                        fee: FeeSchedule {
                            bps: self.u32()?,
                            fixed: Amount::from_micros(self.u64()?),
                        },
                        created_at: Timestamp(self.u64()?),
                    },
                    key_hash,
                }
            }
            3 => {
                let id = PayerId::from_u128(self.u128()?);
                let name = self.text()?;
                let key_hash = KeyHash(self.bytes32()?);
                Imported::Payer {
                    payer: Payer {
                        id,
                        name,
                        created_at: Timestamp(self.u64()?),
                    },
                    key_hash,
                }
            }
            4 => Imported::Account {
                owner: self.owner()?,
                account: Account {
                    id: AccountId(self.u64()?),
                    kind: {
                        let tag = self.u8()?;
                        AccountKind::from_u8(tag).ok_or(DecodeError::UnknownTag(tag))?
                    },
                    currency: self.currency()?,
                    debits_posted: self.u64()?,
                    credits_posted: self.u64()?,
                    debits_pending: self.u64()?,
                    credits_pending: self.u64()?,
                },
            },
            5 => Imported::Transfer(self.transfer_record()?),
            // Version 1 wrote a payment item as an outcome's payment is still written.
            6 => Imported::Payment(self.paid()?),
            7 => Imported::Topup(Topup {
                id: TopupId::from_u128(self.u128()?),
                payer: PayerId::from_u128(self.u128()?),
                amount: Amount::from_micros(self.u64()?),
                currency: self.currency()?,
                source: self.funding_source()?,
                created_at: Timestamp(self.u64()?),
            }),
            8 => Imported::Refund(Refund {
                id: RefundId::from_u128(self.u128()?),
                payment: PaymentId::from_u128(self.u128()?),
                payer: PayerId::from_u128(self.u128()?),
                merchant: MerchantId::from_u128(self.u128()?),
                amount: Amount::from_micros(self.u64()?),
                currency: self.currency()?,
                fee_refunded: Amount::from_micros(self.u64()?),
                created_at: Timestamp(self.u64()?),
            }),
            9 => {
                let payer = PayerId::from_u128(self.u128()?);
                let object = match self.u8()? {
                    1 => EntryObject::Topup(TopupId::from_u128(self.u128()?)),
                    2 => EntryObject::Payment(PaymentId::from_u128(self.u128()?)),
                    3 => EntryObject::Refund(RefundId::from_u128(self.u128()?)),
                    tag => return Err(DecodeError::UnknownTag(tag)),
                };
                Imported::Entry {
                    payer,
                    entry: Entry {
                        object,
                        currency: self.currency()?,
                        credit: self.bool()?,
                        amount: Amount::from_micros(self.u64()?),
                        balance_after: Amount::from_micros(self.u64()?),
                        created_at: Timestamp(self.u64()?),
                    },
                }
            }
            10 => {
                let key = IdempotencyKey {
                    principal: self.principal()?,
                    key: self.text()?,
                };
                let fingerprint = self.bytes32()?;
                let made = Timestamp(self.u64()?);
                let outcome = self.with(|r| r.bytes())?;
                Imported::Idempotency(IdempotencyRow {
                    key,
                    fingerprint,
                    outcome: decode_outcome(outcome)?,
                    made,
                })
            }
            tag => return Err(DecodeError::UnknownTag(tag)),
        })
    }
    pub(crate) fn pay(&mut self) -> Result<PayCommand, DecodeError> {
        Ok(PayCommand {
            id: PaymentId::from_u128(self.u128()?),
            payer: PayerId::from_u128(self.u128()?),
            merchant: MerchantId::from_u128(self.u128()?),
            amount: Amount::from_micros(self.u64()?),
            currency: self.currency()?,
            description: self.opt_text()?,
            reference: self.opt_text()?,
            transfer_ids: [TransferId(self.u128()?), TransferId(self.u128()?)],
        })
    }
}
