//! Test support shared by the journal's tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store_embedded::JOURNAL_FILE;

/// A fresh directory under the system's temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = format!(
            "farthing-journal-{name}-{}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("after 1970")
                .as_nanos()
        );
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).expect("a temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn journal_file(&self) -> PathBuf {
        self.0.join(JOURNAL_FILE)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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
