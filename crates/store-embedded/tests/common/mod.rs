//! Test support shared by the journal's tests.

use std::path::PathBuf;

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store_embedded::JOURNAL_FILE;

pub use farthing_testing::TempDir;

/// Where a test directory keeps a single-file journal.
pub trait JournalFile {
    fn journal_file(&self) -> PathBuf;
}

impl JournalFile for TempDir {
    fn journal_file(&self) -> PathBuf {
        self.path().join(JOURNAL_FILE)
    }
}

/// A record of some variety: the shape depends on `n`, texts include non-ASCII.
pub fn record(n: u64) -> Record {
    let usd = Currency::parse("USD").expect("known");
    let id = u128::from(n) + 1;
    let command = match n % 4 {
        0 => Command::CreatePayer {
            id: PayerId::from_u128(id),
            name: format!("payer {n} — Zoë"),
            key_hash: KeyHash([n as u8; 32]),
        },
        1 => Command::Pay(PayCommand {
            id: PaymentId::from_u128(id),
            payer: PayerId::from_u128(7),
            merchant: MerchantId::from_u128(8),
            amount: Amount::from_micros(2_500 + n),
            currency: usd,
            description: Some("☕".repeat(n as usize % 5)),
            reference: None,
            transfer_ids: [TransferId(id * 2), TransferId(id * 2 + 1)],
        }),
        2 => Command::Topup {
            id: TopupId::from_u128(id),
            payer: PayerId::from_u128(7),
            amount: Amount::from_micros(1_000_000),
            currency: usd,
            source: FundingSource::Sandbox,
            transfer_id: TransferId(id),
        },
        _ => Command::PruneIdempotencyKeys {
            before: Timestamp(n),
        },
    };
    Record {
        now: Timestamp(1_700_000_000_000_000 + n),
        idempotency: n.is_multiple_of(3).then(|| IdempotencyClaim {
            key: IdempotencyKey {
                principal: Principal::Payer(PayerId::from_u128(7)),
                key: format!("key-{n}"),
            },
            fingerprint: [n as u8; 32],
        }),
        command,
    }
}

pub fn records(range: std::ops::Range<u64>) -> Vec<Record> {
    range.map(record).collect()
}
