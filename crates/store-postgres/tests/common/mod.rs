//! The test harness shared by this crate's integration tests: a fresh PostgreSQL database per
//! test, from `FARTHING_TEST_DATABASE_URL`; without that variable a test says it was skipped.
#![allow(dead_code)] // Each test crate uses its own part.

use std::sync::atomic::{AtomicU32, Ordering};

use farthing_ledger::{Amount, Currency, MICROS_PER_UNIT, TransferId};
use farthing_payments::{
    Command, FeeSchedule, FundingSource, MerchantId, PayerId, Record, TopupId,
};
use farthing_store_postgres::{PgError, connect, migrate, with_database};
use farthing_testing::{key_hash, record_at};
use tokio_postgres::Client;

/// At the test epoch: a merchant without fees (id 1), and a payer (id 2) whose USD wallet one
/// top-up (id 3, transfer 3) fills with `units`.
pub fn shop_and_payer(units: u64) -> (Vec<Record>, MerchantId, PayerId) {
    let (merchant, payer) = (MerchantId::from_u128(1), PayerId::from_u128(2));
    let records = vec![
        record_at(
            0,
            Command::CreateMerchant {
                id: merchant,
                name: "Shop".into(),
                key_hash: key_hash(1),
                fee: FeeSchedule::ZERO,
            },
        ),
        record_at(
            0,
            Command::CreatePayer {
                id: payer,
                name: "Ada".into(),
                key_hash: key_hash(2),
            },
        ),
        record_at(
            0,
            Command::Topup {
                id: TopupId::from_u128(3),
                payer,
                amount: Amount::from_micros(units * MICROS_PER_UNIT),
                currency: Currency::parse("USD").expect("USD"),
                source: FundingSource::Sandbox,
                transfer_id: TransferId(3),
            },
        ),
    ];
    (records, merchant, payer)
}

/// A database made for one test and dropped after it, even when the test fails.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create(test: &str) -> Option<TestDatabase> {
        let admin_url = farthing_testing::test_database_url(test)?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "farthing_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let admin = connect(&admin_url)
            .await
            .expect("connect to the test server");
        // One statement each: several in one call run as a transaction, which these refuse.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .await
            .expect("clear a leftover test database");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        let url = with_database(&admin_url, &name);
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl TestDatabase {
    /// A connection to this database, with the schema up to date.
    pub async fn migrated(&self) -> Client {
        let mut client = connect(&self.url)
            .await
            .expect("connect to the test database");
        migrate(&mut client).await.expect("migrate");
        client
    }
}

/// Whether `FARTHING_TEST_DATABASE_URL` is set; when it is not, says that `test` was skipped.
pub fn database_configured(test: &str) -> bool {
    farthing_testing::test_database_url(test).is_some()
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs outside any async context it could borrow: use a runtime of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(async move {
                    let admin = connect(&admin_url).await?;
                    admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .map_err(PgError::from)
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}
