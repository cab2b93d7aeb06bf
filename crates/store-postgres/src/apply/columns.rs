//! Stored forms: how ids, amounts, times, currencies and principals look in columns.

use super::*;
use farthing_payments::codec;

/// A transfer's stored outcome: 0 when applied, else the journal's stable tag for its
/// rejection. These codes never change meaning.
pub(crate) fn transfer_rejection_code(rejection: TransferRejection) -> i16 {
    i16::from(codec::transfer_rejection_tag(rejection))
}

pub(crate) fn transfer_rejection_of(code: i16) -> Option<TransferRejection> {
    codec::transfer_rejection_of(u8::try_from(code).ok()?)
}

pub(crate) fn stored(what: &str) -> PgError {
    PgError::Stored(format!("{what} is out of range"))
}

pub(crate) fn id16(value: u128) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

pub(crate) fn u128_of(bytes: &[u8]) -> Result<u128, PgError> {
    let bytes: [u8; 16] = bytes.try_into().map_err(|_| stored("an id"))?;
    Ok(u128::from_be_bytes(bytes))
}

pub(crate) fn bytes32(bytes: &[u8]) -> Result<[u8; 32], PgError> {
    bytes.try_into().map_err(|_| stored("a hash"))
}

pub(crate) fn big(what: &str, value: u64) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::Stored(format!("{what} does not fit BIGINT")))
}

pub(crate) fn total_of(value: i64) -> Result<u64, PgError> {
    u64::try_from(value).map_err(|_| stored("an account total"))
}

pub(crate) fn amount_of(value: i64) -> Result<Amount, PgError> {
    Ok(Amount::from_micros(
        u64::try_from(value).map_err(|_| stored("an amount"))?,
    ))
}

pub(crate) fn time_of(value: i64) -> Result<Timestamp, PgError> {
    Ok(Timestamp(
        u64::try_from(value).map_err(|_| stored("a time"))?,
    ))
}

pub(crate) fn currency_of(code: String) -> Result<Currency, PgError> {
    Currency::parse(&code).ok_or_else(|| stored("a currency"))
}

/// `principal_kind`: 1 operator (empty id), 2 merchant, 3 payer.
pub(crate) fn principal_columns(principal: Principal) -> (i16, Vec<u8>) {
    match principal {
        Principal::Operator => (1, Vec::new()),
        Principal::Merchant(id) => (2, id16(id.to_u128())),
        Principal::Payer(id) => (3, id16(id.to_u128())),
    }
}

pub(crate) fn principal_of(kind: i16, id: &[u8]) -> Result<Principal, PgError> {
    Ok(match kind {
        1 => Principal::Operator,
        2 => Principal::Merchant(MerchantId::from_u128(u128_of(id)?)),
        3 => Principal::Payer(PayerId::from_u128(u128_of(id)?)),
        _ => return Err(stored("a principal kind")),
    })
}

/// `owner_kind`: 1 payer, 2 merchant, 3 platform fees, 4 external funding (empty id).
pub(crate) fn owner_columns(owner: Owner) -> (i16, Vec<u8>) {
    match owner {
        Owner::Payer(id) => (1, id16(id.to_u128())),
        Owner::Merchant(id) => (2, id16(id.to_u128())),
        Owner::PlatformFees => (3, Vec::new()),
        Owner::ExternalFunding => (4, Vec::new()),
    }
}

pub(crate) fn owner_of(kind: i16, id: &[u8]) -> Result<Owner, PgError> {
    Ok(match kind {
        1 => Owner::Payer(PayerId::from_u128(u128_of(id)?)),
        2 => Owner::Merchant(MerchantId::from_u128(u128_of(id)?)),
        3 => Owner::PlatformFees,
        4 => Owner::ExternalFunding,
        _ => return Err(stored("an owner kind")),
    })
}
