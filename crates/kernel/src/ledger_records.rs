//! The stored form of the ledger's own records: accounts and transfer records.

use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, HoldState, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord, TransferRejection,
};

use crate::{DecodeError, Fields, Get, Put};

impl Fields for Account {
    fn put(&self, out: &mut impl Put) {
        out.bits("id", self.id.0);
        out.code("kind", self.kind.to_u8());
        out.currency("currency", self.currency);
        out.int("debits_posted", self.debits_posted);
        out.int("credits_posted", self.credits_posted);
        out.int("debits_pending", self.debits_pending);
        out.int("credits_pending", self.credits_pending);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let id = AccountId(input.bits("id")?);
        let kind = input.code("kind")?;
        Ok(Account {
            id,
            kind: AccountKind::from_u8(kind).ok_or(DecodeError::UnknownTag(kind))?,
            currency: input.currency("currency")?,
            debits_posted: input.int("debits_posted")?,
            credits_posted: input.int("credits_posted")?,
            debits_pending: input.int("debits_pending")?,
            credits_pending: input.int("credits_pending")?,
        })
    }
}

/// Transfer kinds: 1 posted, 2 pending (with its timeout), 3 post and 4 void (with the hold's
/// id). Hold states: 1 pending, 2 posted, 3 voided, 4 expired.
impl Fields for TransferRecord {
    fn put(&self, out: &mut impl Put) {
        let transfer = &self.transfer;
        let (kind, pending_id, timeout_secs) = match transfer.kind {
            TransferKind::Posted => (1, None, None),
            TransferKind::Pending { timeout_secs } => (2, None, Some(timeout_secs)),
            TransferKind::PostPending { pending_id } => (3, Some(pending_id.0), None),
            TransferKind::VoidPending { pending_id } => (4, Some(pending_id.0), None),
        };
        out.id("id", transfer.id.0);
        out.bits("debit_account", transfer.debit.0);
        out.bits("credit_account", transfer.credit.0);
        out.wide("amount", transfer.amount.micros());
        out.code("kind", kind);
        out.opt_id("pending_id", pending_id);
        out.opt_word("timeout_secs", timeout_secs);
        out.flag("linked", transfer.linked);
        out.code(
            "outcome",
            match self.outcome {
                Ok(()) => 0,
                Err(rejection) => transfer_rejection_tag(rejection),
            },
        );
        out.opt_code("hold_state", self.hold.map(hold_state_code));
        out.opt_int("expires_at", self.expires_at.map(|at| at.0));
        out.int("created_at", self.timestamp.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let id = TransferId(input.id("id")?);
        let debit = AccountId(input.bits("debit_account")?);
        let credit = AccountId(input.bits("credit_account")?);
        let amount = Amount::from_micros(input.wide("amount")?);
        let kind = input.code("kind")?;
        let pending_id = input.opt_id("pending_id")?.map(TransferId);
        let timeout_secs = input.opt_word("timeout_secs")?;
        let kind = match (kind, pending_id, timeout_secs) {
            (1, None, None) => TransferKind::Posted,
            (2, None, Some(timeout_secs)) => TransferKind::Pending { timeout_secs },
            (3, Some(pending_id), None) => TransferKind::PostPending { pending_id },
            (4, Some(pending_id), None) => TransferKind::VoidPending { pending_id },
            (kind, ..) => return Err(DecodeError::UnknownTag(kind)),
        };
        let linked = input.flag("linked")?;
        let outcome = match input.code("outcome")? {
            0 => Ok(()),
            tag => Err(transfer_rejection_of(tag).ok_or(DecodeError::UnknownTag(tag))?),
        };
        let hold = hold_state_of(input.opt_code("hold_state")?.unwrap_or(0))?;
        let expires_at = input.opt_int("expires_at")?.map(Timestamp);
        let timestamp = Timestamp(input.int("created_at")?);
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
}

/// A hold's state as stored: 1 pending, 2 posted, 3 voided, 4 expired (0 is no hold).
pub fn hold_state_code(hold: HoldState) -> u8 {
    match hold {
        HoldState::Pending => 1,
        HoldState::Posted => 2,
        HoldState::Voided => 3,
        HoldState::Expired => 4,
    }
}

/// The hold state stored as `code`: `None` for 0, no hold.
pub fn hold_state_of(code: u8) -> Result<Option<HoldState>, DecodeError> {
    Ok(Some(match code {
        0 => return Ok(None),
        1 => HoldState::Pending,
        2 => HoldState::Posted,
        3 => HoldState::Voided,
        4 => HoldState::Expired,
        tag => return Err(DecodeError::UnknownTag(tag)),
    }))
}

/// The ledger's rejections in a transfer record, each with a stable tag (1 and up; 0 is
/// applied), in every stored form. A stored tag never changes meaning and a new rejection
/// takes a new tag: the match has no catch-all, so it cannot be forgotten.
pub fn transfer_rejection_tag(rejection: TransferRejection) -> u8 {
    use TransferRejection::*;
    match rejection {
        LinkedEventFailed => 1,
        LinkedEventChainOpen => 2,
        IdMustNotBeZero => 3,
        ExistsWithDifferentFields => 4,
        AccountsMustBeDifferent => 5,
        AmountMustNotBeZero => 6,
        PendingTransferNotFound => 7,
        PendingTransferAlreadyPosted => 8,
        PendingTransferAlreadyVoided => 9,
        PendingTransferExpired => 10,
        PendingTransferHasDifferentAccounts => 11,
        ExceedsPendingAmount => 12,
        DebitAccountNotFound => 13,
        CreditAccountNotFound => 14,
        CurrenciesMustMatch => 15,
        Overflow => 16,
        ExceedsAvailableBalance => 17,
    }
}

/// The rejection with this tag (see [`transfer_rejection_tag`]).
pub fn transfer_rejection_of(tag: u8) -> Option<TransferRejection> {
    use TransferRejection::*;
    Some(match tag {
        1 => LinkedEventFailed,
        2 => LinkedEventChainOpen,
        3 => IdMustNotBeZero,
        4 => ExistsWithDifferentFields,
        5 => AccountsMustBeDifferent,
        6 => AmountMustNotBeZero,
        7 => PendingTransferNotFound,
        8 => PendingTransferAlreadyPosted,
        9 => PendingTransferAlreadyVoided,
        10 => PendingTransferExpired,
        11 => PendingTransferHasDifferentAccounts,
        12 => ExceedsPendingAmount,
        13 => DebitAccountNotFound,
        14 => CreditAccountNotFound,
        15 => CurrenciesMustMatch,
        16 => Overflow,
        17 => ExceedsAvailableBalance,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Binary, BinaryReader};
    use farthing_ledger::Currency;

    #[test]
    fn every_transfer_rejection_keeps_its_tag() {
        for tag in 1..=17 {
            let rejection = transfer_rejection_of(tag).expect("a tag in use");
            assert_eq!(transfer_rejection_tag(rejection), tag);
        }
        assert_eq!(transfer_rejection_of(0), None);
        assert_eq!(transfer_rejection_of(18), None);
    }

    #[test]
    fn transfer_records_of_every_kind_round_trip() {
        let base = Transfer {
            id: TransferId(u128::MAX - 3),
            debit: AccountId(u64::MAX),
            credit: AccountId(2),
            amount: Amount::from_micros(u64::MAX),
            kind: TransferKind::Posted,
            linked: true,
        };
        let kinds = [
            TransferKind::Posted,
            TransferKind::Pending { timeout_secs: 0 },
            TransferKind::Pending {
                timeout_secs: u32::MAX,
            },
            TransferKind::PostPending {
                pending_id: TransferId(9),
            },
            TransferKind::VoidPending {
                pending_id: TransferId(10),
            },
        ];
        for (at, kind) in kinds.into_iter().enumerate() {
            let record = TransferRecord {
                transfer: Transfer { kind, ..base },
                timestamp: Timestamp(at as u64),
                outcome: if at % 2 == 0 {
                    Ok(())
                } else {
                    Err(TransferRejection::ExceedsAvailableBalance)
                },
                hold: [None, Some(HoldState::Expired)][at % 2],
                expires_at: [None, Some(Timestamp(77))][at % 2],
            };
            let bytes = Binary::encode(&record);
            assert_eq!(BinaryReader::decode::<TransferRecord>(&bytes), Ok(record));
        }
    }

    #[test]
    fn accounts_round_trip_with_ids_beyond_i64() {
        let account = Account {
            id: AccountId(u64::MAX - 1),
            kind: AccountKind::ExternalFunding,
            currency: Currency::parse("JPY").unwrap(),
            debits_posted: 1,
            credits_posted: 2,
            debits_pending: 3,
            credits_pending: i64::MAX as u64,
        };
        let bytes = Binary::encode(&account);
        assert_eq!(BinaryReader::decode::<Account>(&bytes), Ok(account));
    }
}
