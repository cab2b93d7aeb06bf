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

/// Random 128-bit ids from a fast generator per thread, seeded by the OS. Ids are not secrets
/// (authorization guards every object), so speed matters more than unpredictability; a
/// generator per thread keeps request handlers from contending on a lock.
#[derive(Default)]
pub struct RandomIds;

thread_local! {
    static GENERATOR: std::cell::RefCell<Xoshiro> = std::cell::RefCell::new(Xoshiro::from_os());
}

impl Ids for RandomIds {
    fn next_id(&self) -> u128 {
        GENERATOR.with(|generator| {
            let mut rng = generator.borrow_mut();
            (u128::from(rng.next()) << 64) | u128::from(rng.next())
        })
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
