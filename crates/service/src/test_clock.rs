//! A clock the operator moves forward, as Stripe's test clocks: the wall clock plus an offset
//! that only grows, kept durably by the store ([`TestClockStore`]) so that time never goes
//! back, across restarts and between servers sharing a database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use farthing_ledger::Timestamp;
use farthing_store::{StoreError, TestClockStore};

use crate::env::{Clock, SystemClock};

/// The largest single step: a hundred years.
pub const TEST_CLOCK_ADVANCE_SECS_MAX: u64 = 100 * 365 * 24 * 60 * 60;
/// How far ahead of the wall clock a test clock may run at most: a thousand years, so that
/// every time stays a date that can be written.
pub const TEST_CLOCK_LEAD_SECS_MAX: u64 = 1_000 * 365 * 24 * 60 * 60;

pub struct TestClock {
    /// Microseconds ahead of the wall clock.
    offset_micros: AtomicU64,
    store: Arc<dyn TestClockStore>,
}

impl TestClock {
    /// A test clock at the offset `store` keeps.
    pub async fn open(store: Arc<dyn TestClockStore>) -> Result<TestClock, StoreError> {
        let offset = store.test_clock_offset().await?;
        Ok(TestClock {
            offset_micros: AtomicU64::new(offset),
            store,
        })
    }

    /// Whether a step of `secs` seconds keeps the clock within [`TEST_CLOCK_LEAD_SECS_MAX`].
    pub fn may_advance(&self, secs: u64) -> bool {
        secs <= TEST_CLOCK_ADVANCE_SECS_MAX
            && self.offset_micros.load(Ordering::SeqCst) / 1_000_000 + secs
                <= TEST_CLOCK_LEAD_SECS_MAX
    }

    /// Moves the clock `secs` seconds forward, durably, and answers the time now.
    pub async fn advance(&self, secs: u64) -> Result<Timestamp, StoreError> {
        assert!(secs <= TEST_CLOCK_ADVANCE_SECS_MAX, "checked at the edge");
        let offset = self.store.advance_test_clock(secs * 1_000_000).await?;
        self.offset_micros.fetch_max(offset, Ordering::SeqCst);
        Ok(self.now())
    }

    /// Takes up steps that other servers sharing the store have made.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let offset = self.store.test_clock_offset().await?;
        self.offset_micros.fetch_max(offset, Ordering::SeqCst);
        Ok(())
    }
}

impl Clock for TestClock {
    fn now(&self) -> Timestamp {
        Timestamp(
            SystemClock
                .now()
                .0
                .saturating_add(self.offset_micros.load(Ordering::SeqCst)),
        )
    }
}
