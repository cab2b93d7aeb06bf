//! How each table's rows are read: the columns to select, in order, and the reader that turns
//! such a row into a domain object. The write path (`apply`), the read side (`query`) and the
//! export share them, so a column list and its reader cannot drift apart.
//!
//! A query may select more columns after these: the readers only look at the first ones.

use farthing_ledger::{Account, AccountId, AccountKind, Amount, HoldState, Transfer, TransferId};
use farthing_ledger::{TransferKind, TransferRecord};
use farthing_payments::codec::decode_outcome;
use farthing_payments::{
    Entry, EntryObject, FeeSchedule, FundingSource, IdempotencyKey, IdempotencyRow, Merchant,
    MerchantId, Owner, Payer, PayerId, Payment, PaymentId, Refund, RefundId, Topup, TopupId,
};
use tokio_postgres::Row;

use crate::PgError;
use crate::apply::{
    Id, amount_of, bytes32, currency_of, owner_of, principal_of, stored, time_of, total_of,
    transfer_rejection_of, u128_of,
};

pub(crate) const MERCHANT_COLUMNS: &str = "id, name, fee_bps, fee_fixed::TEXT, created_at";

pub(crate) fn merchant_of(row: &Row) -> Result<Merchant, PgError> {
    Ok(Merchant {
        id: MerchantId::from_u128(u128_of(row.get(0))?),
        name: row.get(1),
        fee: FeeSchedule {
            bps: u32::try_from(row.get::<_, i32>(2)).map_err(|_| stored("fee_bps"))?,
            fixed: Amount::from_micros(
                row.get::<_, &str>(3)
                    .parse()
                    .map_err(|_| stored("fee_fixed"))?,
            ),
        },
        created_at: time_of(row.get(4))?,
    })
}

pub(crate) const PAYER_COLUMNS: &str = "id, name, created_at";

pub(crate) fn payer_of(row: &Row) -> Result<Payer, PgError> {
    Ok(Payer {
        id: PayerId::from_u128(u128_of(row.get(0))?),
        name: row.get(1),
        created_at: time_of(row.get(2))?,
    })
}

pub(crate) const PAYMENT_COLUMNS: &str = "id, payer, merchant, amount, currency::TEXT, fee, \
     description, reference, created_at, amount_refunded, fee_refunded";

pub(crate) fn payment_of(row: &Row) -> Result<Payment, PgError> {
    Ok(Payment {
        id: PaymentId::from_u128(u128_of(row.get(0))?),
        payer: PayerId::from_u128(u128_of(row.get(1))?),
        merchant: MerchantId::from_u128(u128_of(row.get(2))?),
        amount: amount_of(row.get(3))?,
        currency: currency_of(row.get(4))?,
        fee: amount_of(row.get(5))?,
        description: row.get(6),
        reference: row.get(7),
        created_at: time_of(row.get(8))?,
        amount_refunded: amount_of(row.get(9))?,
        fee_refunded: amount_of(row.get(10))?,
    })
}

pub(crate) const TOPUP_COLUMNS: &str = "id, payer, amount, currency::TEXT, source, created_at";

pub(crate) fn topup_of(row: &Row) -> Result<Topup, PgError> {
    Ok(Topup {
        id: TopupId::from_u128(u128_of(row.get(0))?),
        payer: PayerId::from_u128(u128_of(row.get(1))?),
        amount: amount_of(row.get(2))?,
        currency: currency_of(row.get(3))?,
        source: match row.get::<_, i16>(4) {
            1 => FundingSource::Sandbox,
            2 => FundingSource::SandboxDecline,
            _ => return Err(stored("topups.source")),
        },
        created_at: time_of(row.get(5))?,
    })
}

pub(crate) const REFUND_COLUMNS: &str =
    "id, payment, payer, merchant, amount, currency::TEXT, fee_refunded, created_at";

pub(crate) fn refund_of(row: &Row) -> Result<Refund, PgError> {
    Ok(Refund {
        id: RefundId::from_u128(u128_of(row.get(0))?),
        payment: PaymentId::from_u128(u128_of(row.get(1))?),
        payer: PayerId::from_u128(u128_of(row.get(2))?),
        merchant: MerchantId::from_u128(u128_of(row.get(3))?),
        amount: amount_of(row.get(4))?,
        currency: currency_of(row.get(5))?,
        fee_refunded: amount_of(row.get(6))?,
        created_at: time_of(row.get(7))?,
    })
}

pub(crate) const ACCOUNT_COLUMNS: &str = "id, owner_kind, owner_id, currency::TEXT, kind, \
     debits_posted, credits_posted, debits_pending, credits_pending";

/// An account and its owner.
pub(crate) fn account_of(row: &Row) -> Result<(Owner, Account), PgError> {
    let owner = owner_of(row.get(1), row.get(2))?;
    let account = Account {
        id: AccountId(row.get::<_, i64>(0) as u64),
        kind: AccountKind::from_u8(
            u8::try_from(row.get::<_, i16>(4)).map_err(|_| stored("accounts.kind"))?,
        )
        .ok_or_else(|| stored("accounts.kind"))?,
        currency: currency_of(row.get(3))?,
        debits_posted: total_of(row.get(5))?,
        credits_posted: total_of(row.get(6))?,
        debits_pending: total_of(row.get(7))?,
        credits_pending: total_of(row.get(8))?,
    };
    Ok((owner, account))
}

pub(crate) const TRANSFER_COLUMNS: &str = "id, debit_account, credit_account, amount::TEXT, \
     kind, pending_id, timeout_secs, linked, outcome, hold_state, expires_at, created_at";

pub(crate) fn transfer_record_of(row: &Row) -> Result<TransferRecord, PgError> {
    let pending_id = |row: &Row| -> Result<TransferId, PgError> {
        let bytes: Option<Id> = row.get(5);
        Ok(TransferId(u128_of(
            bytes.ok_or_else(|| stored("transfers.pending_id"))?,
        )?))
    };
    let kind = match row.get::<_, i16>(4) {
        1 => TransferKind::Posted,
        2 => TransferKind::Pending {
            timeout_secs: row
                .get::<_, Option<i32>>(6)
                .ok_or_else(|| stored("transfers.timeout_secs"))? as u32,
        },
        3 => TransferKind::PostPending {
            pending_id: pending_id(row)?,
        },
        4 => TransferKind::VoidPending {
            pending_id: pending_id(row)?,
        },
        _ => return Err(stored("transfers.kind")),
    };
    let outcome = match row.get::<_, i16>(8) {
        0 => Ok(()),
        code => Err(transfer_rejection_of(code).ok_or_else(|| stored("transfers.outcome"))?),
    };
    let hold = match row.get::<_, Option<i16>>(9) {
        None => None,
        Some(1) => Some(HoldState::Pending),
        Some(2) => Some(HoldState::Posted),
        Some(3) => Some(HoldState::Voided),
        Some(4) => Some(HoldState::Expired),
        Some(_) => return Err(stored("transfers.hold_state")),
    };
    Ok(TransferRecord {
        transfer: Transfer {
            id: TransferId(u128_of(row.get(0))?),
            debit: AccountId(row.get::<_, i64>(1) as u64),
            credit: AccountId(row.get::<_, i64>(2) as u64),
            amount: Amount::from_micros(
                row.get::<_, &str>(3)
                    .parse()
                    .map_err(|_| stored("transfers.amount"))?,
            ),
            kind,
            linked: row.get(7),
        },
        timestamp: time_of(row.get(11))?,
        outcome,
        hold,
        expires_at: row.get::<_, Option<i64>>(10).map(time_of).transpose()?,
    })
}

pub(crate) const IDEMPOTENCY_COLUMNS: &str =
    "principal_kind, principal_id, key, fingerprint, outcome, created_at";

pub(crate) fn idempotency_row_of(row: &Row) -> Result<IdempotencyRow, PgError> {
    Ok(IdempotencyRow {
        key: IdempotencyKey {
            principal: principal_of(row.get(0), row.get(1))?,
            key: row.get(2),
        },
        fingerprint: bytes32(row.get(3))?,
        outcome: decode_outcome(row.get(4))
            .map_err(|error| PgError::Stored(format!("an idempotency outcome: {error}")))?,
        made: time_of(row.get(5))?,
    })
}

pub(crate) const ENTRY_COLUMNS: &str =
    "object_kind, object_id, currency::TEXT, credit, amount, balance_after, created_at";

pub(crate) fn entry_of(row: &Row) -> Result<Entry, PgError> {
    let id = u128_of(row.get(1))?;
    Ok(Entry {
        object: match row.get::<_, i16>(0) {
            1 => EntryObject::Topup(TopupId::from_u128(id)),
            2 => EntryObject::Payment(PaymentId::from_u128(id)),
            3 => EntryObject::Refund(RefundId::from_u128(id)),
            _ => return Err(stored("statement_lines.object_kind")),
        },
        currency: currency_of(row.get(2))?,
        credit: row.get(3),
        amount: amount_of(row.get(4))?,
        balance_after: amount_of(row.get(5))?,
        created_at: time_of(row.get(6))?,
    })
}
