//! Wallets and top-ups: the ledger accounts each owner holds per currency, and money coming in.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::{Account, AccountKind, Amount, Currency, Timestamp};

use crate::ids::{MerchantId, PayerId, TopupId};

/// Whose money a ledger account holds. Each owner has at most one account per currency, and
/// the account's id is derived from the two ([`crate::account_id`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Owner {
    /// The payer's prepaid wallet.
    Payer(PayerId),
    /// The merchant's earnings.
    Merchant(MerchantId),
    /// The platform's fee income.
    PlatformFees,
    /// Money outside the ledger: where top-ups come from.
    ExternalFunding,
}

impl Owner {
    /// The kind of account this owner holds.
    pub fn account_kind(self) -> AccountKind {
        match self {
            Owner::Payer(_) => AccountKind::PayerWallet,
            Owner::Merchant(_) => AccountKind::Merchant,
            Owner::PlatformFees => AccountKind::PlatformFees,
            Owner::ExternalFunding => AccountKind::ExternalFunding,
        }
    }
}

/// Where top-up money comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FundingSource {
    /// The built-in sandbox provider: always succeeds.
    Sandbox,
    /// The built-in sandbox provider, told to decline.
    SandboxDecline,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Topup {
    pub id: TopupId,
    pub payer: PayerId,
    pub amount: Amount,
    pub currency: Currency,
    pub source: FundingSource,
    pub created_at: Timestamp,
}

impl Owner {
    /// The owner as a kind (1 payer, 2 merchant, 3 platform fees, 4 external funding) and an
    /// id (0 for the last two): its stored form everywhere, and what its accounts' ids are
    /// derived from.
    pub fn parts(self) -> (u8, u128) {
        match self {
            Owner::Payer(payer) => (1, payer.to_u128()),
            Owner::Merchant(merchant) => (2, merchant.to_u128()),
            Owner::PlatformFees => (3, 0),
            Owner::ExternalFunding => (4, 0),
        }
    }

    /// The owner of [`Owner::parts`]; an unknown kind, or an id given to an owner that has
    /// none, is refused.
    pub fn from_parts(kind: u8, id: u128) -> Result<Owner, DecodeError> {
        match (kind, id) {
            (1, id) => Ok(Owner::Payer(PayerId::from_u128(id))),
            (2, id) => Ok(Owner::Merchant(MerchantId::from_u128(id))),
            (3, 0) => Ok(Owner::PlatformFees),
            (4, 0) => Ok(Owner::ExternalFunding),
            (kind, _) => Err(DecodeError::UnknownTag(kind)),
        }
    }

    /// The stored form: [`Owner::parts`].
    pub fn put_fields(self, out: &mut impl Put) {
        let (kind, id) = self.parts();
        out.code("owner_kind", kind);
        out.id("owner_id", id);
    }

    pub fn get_fields(input: &mut impl Get) -> Result<Owner, DecodeError> {
        let kind = input.code("owner_kind")?;
        let id = input.id("owner_id")?;
        Owner::from_parts(kind, id)
    }
}

impl FundingSource {
    pub fn code(self) -> u8 {
        match self {
            FundingSource::Sandbox => 1,
            FundingSource::SandboxDecline => 2,
        }
    }

    pub fn of_code(code: u8) -> Option<FundingSource> {
        match code {
            1 => Some(FundingSource::Sandbox),
            2 => Some(FundingSource::SandboxDecline),
            _ => None,
        }
    }
}

/// A ledger account as stored, with its owner.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AccountRow {
    pub owner: Owner,
    pub account: Account,
}

impl Fields for AccountRow {
    fn put(&self, out: &mut impl Put) {
        self.owner.put_fields(out);
        self.account.put(out);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        Ok(AccountRow {
            owner: Owner::get_fields(input)?,
            account: Account::get(input)?,
        })
    }
}

impl Fields for Topup {
    fn put(&self, out: &mut impl Put) {
        out.id("id", self.id.to_u128());
        out.id("payer", self.payer.to_u128());
        out.int("amount", self.amount.micros());
        out.currency("currency", self.currency);
        out.code("source", self.source.code());
        out.int("created_at", self.created_at.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let id = TopupId::from_u128(input.id("id")?);
        let payer = PayerId::from_u128(input.id("payer")?);
        let amount = Amount::from_micros(input.int("amount")?);
        let currency = input.currency("currency")?;
        let source = input.code("source")?;
        Ok(Topup {
            id,
            payer,
            amount,
            currency,
            source: FundingSource::of_code(source).ok_or(DecodeError::UnknownTag(source))?,
            created_at: Timestamp(input.int("created_at")?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every owner comes back from its parts; an unknown kind, or an id on an owner that has
    /// none, is refused.
    #[test]
    fn an_owner_comes_back_from_its_parts_and_nothing_else_does() {
        let id = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        for owner in [
            Owner::Payer(PayerId::from_u128(id)),
            Owner::Merchant(MerchantId::from_u128(id)),
            Owner::PlatformFees,
            Owner::ExternalFunding,
        ] {
            let (kind, id) = owner.parts();
            assert_eq!(Owner::from_parts(kind, id), Ok(owner));
        }
        assert_eq!(Owner::from_parts(0, 0), Err(DecodeError::UnknownTag(0)));
        assert_eq!(Owner::from_parts(5, 0), Err(DecodeError::UnknownTag(5)));
        assert_eq!(Owner::from_parts(3, 1), Err(DecodeError::UnknownTag(3)));
        assert_eq!(Owner::from_parts(4, id), Err(DecodeError::UnknownTag(4)));
    }
}
