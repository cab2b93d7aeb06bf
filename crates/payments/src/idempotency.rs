//! Idempotency: a key presented with a request, scoped to its caller, and the first answer it
//! got, kept for a day.

use farthing_kernel::{DecodeError, Fields, Get, Put};
use farthing_ledger::Timestamp;

use crate::codec::{decode_outcome, encode_outcome};
use crate::model::Outcome;
use crate::parties::Principal;

/// An idempotency key presented with a command.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct IdempotencyKey {
    pub principal: Principal,
    pub key: String,
}

/// The longest idempotency key accepted (Stripe's limit).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyClaim {
    pub key: IdempotencyKey,
    /// A digest of the request (method, path and body); the same key with another request
    /// is refused.
    pub fingerprint: [u8; 32],
}

/// An idempotency key's stored answer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IdempotencyRow {
    pub key: IdempotencyKey,
    /// The digest of the request first made with the key.
    pub fingerprint: [u8; 32],
    pub outcome: Outcome,
    /// When the key was first used: pruning forgets keys by this time.
    pub made: Timestamp,
}

impl Fields for IdempotencyRow {
    fn put(&self, out: &mut impl Put) {
        self.key
            .principal
            .put_fields(out, "principal_kind", "principal_id");
        out.text("key", &self.key.key);
        out.digest("fingerprint", &self.fingerprint);
        let mut outcome = Vec::new();
        encode_outcome(&self.outcome, &mut outcome);
        out.blob("outcome", &outcome);
        out.int("created_at", self.made.0);
    }

    fn get(input: &mut impl Get) -> Result<Self, DecodeError> {
        let principal = Principal::get_fields(input, "principal_kind", "principal_id")?;
        let key = input.text("key")?;
        let fingerprint = input.digest("fingerprint")?;
        let outcome = input.blob("outcome")?;
        let made = Timestamp(input.int("created_at")?);
        Ok(IdempotencyRow {
            key: IdempotencyKey { principal, key },
            fingerprint,
            outcome: decode_outcome(&outcome)?,
            made,
        })
    }
}
