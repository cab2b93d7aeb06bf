//! Rate limits, with `governor`'s keyed GCRA limiters: requests per API key, and failed
//! authentications per client address.
//!
//! Failed authentications are counted per address, and once an address has failed too often,
//! every request from it that carries a key answers 429 before its key is looked at, valid or
//! not. So a 429 tells a guesser nothing about the key it sent, and guessing runs at the
//! failure rate, not at the server's speed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use farthing_payments::Principal;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Addresses blocked at once at most; beyond this the map is cleared of expired blocks, then
/// emptied (the failure limiter still holds each address's history).
const BLOCKED_ADDRESSES_MAX: usize = 100_000;

/// How often keyed limiters forget keys whose buckets are full again, so that their memory
/// stays bounded by the keys seen recently.
pub const LIMITER_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

pub struct Limits {
    /// Requests per API key; `None` when the operator turned the limit off.
    per_key: Option<DefaultKeyedRateLimiter<Principal>>,
    /// Failed authentications per client address.
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses that failed too often, and until when they are refused.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    /// Whether `blocked` may hold anything: every request asks, and almost always none is
    /// blocked, so the common answer takes no lock.
    any_blocked: AtomicBool,
}

/// What the failure limit says of a request from an address.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Refused for this long.
    Blocked(Duration),
}

impl Limits {
    /// `per_key_per_sec` requests per second per API key, with bursts of twice that (0 turns
    /// that limit off); `failures_per_min` failed authentications per minute per address,
    /// with bursts of as many.
    pub fn new(per_key_per_sec: u32, failures_per_min: u32) -> Limits {
        let per_key = NonZeroU32::new(per_key_per_sec).map(|rate| {
            let burst = rate.saturating_mul(NonZeroU32::new(2).expect("two"));
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let failures = NonZeroU32::new(failures_per_min).unwrap_or(NonZeroU32::MIN);
        Limits {
            per_key,
            failures: RateLimiter::keyed(Quota::per_minute(failures)),
            blocked: Mutex::new(HashMap::new()),
            any_blocked: AtomicBool::new(false),
        }
    }

    /// Whether a request with this key may go on now.
    pub fn allow_key(&self, principal: Principal) -> bool {
        match &self.per_key {
            None => true,
            Some(limiter) => limiter.check_key(&principal).is_ok(),
        }
    }

    /// Whether a request that carries a key may be authenticated, from `address`.
    pub fn admit(&self, address: IpAddr) -> Admission {
        if !self.any_blocked.load(Ordering::Acquire) {
            return Admission::Open;
        }
        let blocked = self.blocked.lock().expect("blocked addresses lock");
        match blocked.get(&address) {
            Some(until) => match until.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Admission::Blocked(left),
                _ => Admission::Open,
            },
            None => Admission::Open,
        }
    }

    /// Counts a failed authentication from `address`; answers whether the address is now
    /// blocked, and for how long.
    pub fn fail(&self, address: IpAddr) -> Admission {
        let Err(not_until) = self.failures.check_key(&address) else {
            return Admission::Open;
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("blocked addresses lock");
        if blocked.len() >= BLOCKED_ADDRESSES_MAX {
            blocked.retain(|_, until| *until > now);
            if blocked.len() >= BLOCKED_ADDRESSES_MAX {
                blocked.clear();
            }
        }
        blocked.insert(address, now + wait);
        self.any_blocked.store(true, Ordering::Release);
        Admission::Blocked(wait)
    }

    /// Forgets what no longer limits anyone: keys and addresses whose buckets are full again,
    /// and blocks that have ended.
    pub fn sweep(&self) {
        if let Some(limiter) = &self.per_key {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
        let now = Instant::now();
        let mut blocked = self.blocked.lock().expect("blocked addresses lock");
        blocked.retain(|_, until| *until > now);
        // Under the lock, so that a block added meanwhile is not hidden.
        self.any_blocked
            .store(!blocked.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_its_failures_and_only_that_address() {
        let limits = Limits::new(0, 3);
        let guesser: IpAddr = "192.0.2.1".parse().expect("an address");
        let other: IpAddr = "192.0.2.2".parse().expect("an address");
        for _ in 0..3 {
            assert_eq!(limits.admit(guesser), Admission::Open);
            assert_eq!(limits.fail(guesser), Admission::Open);
        }
        assert!(matches!(limits.fail(guesser), Admission::Blocked(_)));
        assert!(
            matches!(limits.admit(guesser), Admission::Blocked(left) if left <= Duration::from_secs(20))
        );
        assert_eq!(limits.admit(other), Admission::Open);
    }

    #[test]
    fn a_key_beyond_its_burst_is_refused_and_others_are_not() {
        let limits = Limits::new(2, 10);
        let (a, b) = (
            Principal::Operator,
            Principal::Payer(farthing_payments::PayerId::from_u128(1)),
        );
        let allowed = (0..10).filter(|_| limits.allow_key(a)).count();
        assert_eq!(allowed, 4, "bursts of twice the rate");
        assert!(limits.allow_key(b));
    }
}
