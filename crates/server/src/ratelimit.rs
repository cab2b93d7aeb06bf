//! A token bucket per API key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use farthing_payments::Principal;

/// Keys tracked at most; beyond this the oldest buckets are dropped (they refill anyway).
const BUCKETS_MAX: usize = 1_000_000;

pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<Principal, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_sec` requests per second per key, with bursts of twice that; 0 turns it off.
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(per_sec) * 2.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn allow(&self, principal: Principal) -> bool {
        if self.per_sec == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limiter lock");
        if buckets.len() >= BUCKETS_MAX {
            buckets.clear();
        }
        let (tokens, last) = buckets.entry(principal).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
