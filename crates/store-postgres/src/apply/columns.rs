//! Stored forms: how ids, amounts, times, currencies and principals look in columns.

use super::*;
use farthing_payments::codec;

/// A transfer's stored outcome: 0 when applied, else the journal's stable tag for its
/// rejection. These codes never change meaning.
pub(crate) fn transfer_rejection_code(rejection: TransferRejection) -> i16 {
    i16::from(codec::transfer_rejection_tag(rejection))
}

pub(crate) fn stored(what: &str) -> PgError {
    PgError::Stored(format!("{what} is out of range"))
}

/// An object id as stored: a `UUID` holding its 128 bits big-endian. The nil UUID stands for
/// "no id" where a column needs one (the platform's accounts, the operator's keys).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Id(pub(crate) [u8; 16]);

impl Id {
    pub(crate) const NIL: Id = Id([0; 16]);
}

impl tokio_postgres::types::ToSql for Id {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_slice(&self.0);
        Ok(tokio_postgres::types::IsNull::No)
    }

    tokio_postgres::types::accepts!(UUID);
    tokio_postgres::types::to_sql_checked!();
}

impl<'a> tokio_postgres::types::FromSql<'a> for Id {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Id, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Id(raw.try_into()?))
    }

    tokio_postgres::types::accepts!(UUID);
}

pub(crate) fn id16(value: u128) -> Id {
    Id(value.to_be_bytes())
}

pub(crate) fn u128_of(id: Id) -> Result<u128, PgError> {
    Ok(u128::from_be_bytes(id.0))
}

pub(crate) fn bytes32(bytes: &[u8]) -> Result<[u8; 32], PgError> {
    bytes.try_into().map_err(|_| stored("a hash"))
}

pub(crate) fn big(what: &str, value: u64) -> Result<i64, PgError> {
    i64::try_from(value).map_err(|_| PgError::Stored(format!("{what} does not fit BIGINT")))
}

pub(crate) fn currency_of(code: String) -> Result<Currency, PgError> {
    Currency::parse(&code).ok_or_else(|| stored("a currency"))
}

/// `principal_kind`: 1 operator (nil id), 2 merchant, 3 payer.
pub(crate) fn principal_columns(principal: Principal) -> (i16, Id) {
    match principal {
        Principal::Operator => (1, Id::NIL),
        Principal::Merchant(id) => (2, id16(id.to_u128())),
        Principal::Payer(id) => (3, id16(id.to_u128())),
    }
}

pub(crate) fn principal_of(kind: i16, id: Id) -> Result<Principal, PgError> {
    Ok(match kind {
        1 => Principal::Operator,
        2 => Principal::Merchant(MerchantId::from_u128(u128_of(id)?)),
        3 => Principal::Payer(PayerId::from_u128(u128_of(id)?)),
        _ => return Err(stored("a principal kind")),
    })
}

/// `owner_kind` and `owner_id`: [`Owner::parts`] (1 payer, 2 merchant, 3 platform fees,
/// 4 external funding; the nil id for the last two).
pub(crate) fn owner_columns(owner: Owner) -> (i16, Id) {
    let (kind, id) = owner.parts();
    (i16::from(kind), id16(id))
}
