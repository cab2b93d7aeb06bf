//! Refusals answered without a record, remembered by idempotency key so that a retry replays
//! them, as every idempotent answer is.
//!
//! They live in memory only, for [`crate::IDEMPOTENCY_TTL_SECS`] and at most
//! [`REFUSALS_REMEMBERED_MAX`] of them: a refusal moved no money, so a retry after a restart
//! (or after the oldest are forgotten) that runs again can at worst succeed where the first
//! attempt was refused, never pay twice.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use farthing_ledger::Timestamp;
use farthing_payments::{IdempotencyClaim, IdempotencyKey, Outcome, Rejection};

/// Refusals remembered at most; the oldest are forgotten first.
pub const REFUSALS_REMEMBERED_MAX: usize = 100_000;

#[derive(Default)]
pub struct Refusals {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_key: HashMap<IdempotencyKey, ([u8; 32], Rejection)>,
    /// Keys in the order they were remembered, with when.
    order: VecDeque<(Timestamp, IdempotencyKey)>,
}

impl Refusals {
    /// The answer for a request under `claim` if it was refused before: the same refusal for
    /// the same request, `idempotency_key_reused` for another.
    pub fn answer(&self, claim: &IdempotencyClaim) -> Option<Outcome> {
        let inner = self.inner.lock().expect("refusals lock");
        let (fingerprint, rejection) = inner.by_key.get(&claim.key)?;
        Some(Outcome::Rejected(if *fingerprint == claim.fingerprint {
            *rejection
        } else {
            Rejection::IdempotencyKeyReused
        }))
    }

    /// Remembers that the request under `claim` was refused with `rejection` at `now`, and
    /// forgets refusals older than the idempotency window.
    pub fn remember(&self, claim: &IdempotencyClaim, rejection: Rejection, now: Timestamp) {
        let mut inner = self.inner.lock().expect("refusals lock");
        let oldest = Timestamp(
            now.0
                .saturating_sub(crate::IDEMPOTENCY_TTL_SECS * 1_000_000),
        );
        while let Some((made, _)) = inner.order.front() {
            if *made >= oldest && inner.order.len() < REFUSALS_REMEMBERED_MAX {
                break;
            }
            let (_, key) = inner.order.pop_front().expect("front exists");
            inner.by_key.remove(&key);
        }
        if inner
            .by_key
            .insert(claim.key.clone(), (claim.fingerprint, rejection))
            .is_none()
        {
            inner.order.push_back((now, claim.key.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farthing_payments::Principal;

    fn claim(key: &str, fingerprint: u8) -> IdempotencyClaim {
        IdempotencyClaim {
            key: IdempotencyKey {
                principal: Principal::Operator,
                key: key.to_string(),
            },
            fingerprint: [fingerprint; 32],
        }
    }

    #[test]
    fn a_refusal_replays_for_the_same_request_and_refuses_another() {
        let refusals = Refusals::default();
        assert_eq!(refusals.answer(&claim("a", 1)), None);
        refusals.remember(&claim("a", 1), Rejection::InsufficientFunds, Timestamp(1));
        assert_eq!(
            refusals.answer(&claim("a", 1)),
            Some(Outcome::Rejected(Rejection::InsufficientFunds))
        );
        assert_eq!(
            refusals.answer(&claim("a", 2)),
            Some(Outcome::Rejected(Rejection::IdempotencyKeyReused))
        );
    }

    #[test]
    fn refusals_are_forgotten_after_the_idempotency_window() {
        let refusals = Refusals::default();
        refusals.remember(&claim("old", 1), Rejection::FundingDeclined, Timestamp(0));
        let later = Timestamp((crate::IDEMPOTENCY_TTL_SECS + 1) * 1_000_000);
        refusals.remember(&claim("new", 1), Rejection::FundingDeclined, later);
        assert_eq!(refusals.answer(&claim("old", 1)), None);
        assert!(refusals.answer(&claim("new", 1)).is_some());
    }
}
