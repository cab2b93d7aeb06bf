//! Time and ids, injected so that tests and simulations can choose them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use farthing_ledger::Timestamp;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Timestamp(micros)
    }
}

/// A clock that only moves when told to.
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(AtomicU64::new(start.0))
    }
    pub fn advance_secs(&self, secs: u64) {
        self.0.fetch_add(secs * 1_000_000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Where object and transfer ids come from.
pub trait Ids: Send + Sync + 'static {
    fn next_id(&self) -> u128;
}

/// Ids that grow with time: the microseconds since the Unix epoch in the high 64 bits, 64
/// random bits below. New objects' ids then sort roughly in the order they were made, so a
/// store appends them at the end of its indexes instead of scattering them over every page
/// (ADR 0004); ids made in the same microsecond differ in their 64 random bits. Ids are not
/// secrets (authorization guards every object), so speed matters more than unpredictability:
/// the random bits come from a fast generator per thread, seeded by the OS, so request
/// handlers never contend on a lock.
#[derive(Default)]
pub struct TimeOrderedIds;

thread_local! {
    static GENERATOR: std::cell::RefCell<Xoshiro> = std::cell::RefCell::new(Xoshiro::from_os());
}

impl Ids for TimeOrderedIds {
    fn next_id(&self) -> u128 {
        // The clock is read for every id: a reading shared by several ids would, in a thread
        // that then went quiet, stamp its next ids with a time long past. A clock before 1970
        // gives 0: the ids stay unique, only their order is lost.
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| {
                u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
            });
        let random = GENERATOR.with(|generator| generator.borrow_mut().next());
        (u128::from(micros) << 64) | u128::from(random)
    }
}

/// Sequential ids from a seed: for reproducible tests.
pub struct SequentialIds(AtomicU64);

impl SequentialIds {
    pub fn new(start: u64) -> SequentialIds {
        SequentialIds(AtomicU64::new(start))
    }
}

impl Ids for SequentialIds {
    fn next_id(&self) -> u128 {
        u128::from(self.0.fetch_add(1, Ordering::SeqCst))
    }
}

/// xoshiro256**.
struct Xoshiro([u64; 4]);

impl Xoshiro {
    fn from_os() -> Xoshiro {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS random source works");
        let mut words = [0u64; 4];
        for (word, chunk) in words.iter_mut().zip(seed.chunks(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("eight bytes")) | 1;
        }
        Xoshiro(words)
    }

    fn next(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_later_sort_after_earlier_ones_and_never_repeat() {
        let ids = TimeOrderedIds;
        let first = ids.next_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later: Vec<u128> = (0..1_000).map(|_| ids.next_id()).collect();
        assert!(later.iter().all(|id| *id > first));
        let mut unique = later.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), later.len());
        // The high half is the time: within a second of now.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let made = (later[0] >> 64) as u64;
        assert!(made <= now && now - made < 1_000_000);
    }
}
