//! `farthing bench` reports every figure the benchmarks promise. A quick run checks that each
//! benchmark runs end to end and measures something; how fast is BENCHMARKS.md's business.

use std::process::Command;

#[test]
fn a_quick_bench_reports_every_figure_as_a_positive_number() {
    let dir = std::env::temp_dir().join(format!("farthing-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["bench", "--quick", "--json", "--seconds", "1", "--dir"])
        .arg(&dir)
        .env_remove("FARTHING_DATABASE_URL")
        .output()
        .expect("run farthing bench");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bench --json prints one JSON document");
    let positive = |value: &serde_json::Value, what: &str| {
        let number = value
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is missing: {report}"));
        assert!(number > 0.0, "{what} is {number}");
    };
    positive(&report["ledger_core_transfers_per_sec"], "ledger core");
    let store = report["durable_store"]
        .as_array()
        .expect("durable store rows");
    for accounts in [10_000, 10] {
        for batch in [1, 100, 8_190] {
            let row = store
                .iter()
                .find(|row| row["accounts"] == accounts && row["batch"] == batch)
                .unwrap_or_else(|| {
                    panic!("no durable store row for {accounts} accounts, batch {batch}")
                });
            positive(&row["transfers_per_sec"], "durable store");
        }
    }
    positive(&report["recovery"]["payments_per_sec"], "recovery");
    positive(
        &report["memory_bytes_per_ledger_account"],
        "memory per account",
    );
    positive(&report["memory_bytes_per_payment"], "memory per payment");
    let single = report["http"]["single"].as_array().expect("HTTP rows");
    for connections in [1, 16, 256] {
        let row = single
            .iter()
            .find(|row| row["connections"] == connections)
            .unwrap_or_else(|| panic!("no HTTP row for {connections} connections"));
        positive(&row["payments_per_sec"], "HTTP payments/s");
        positive(&row["p50_ms"], "p50");
        positive(&row["p99_ms"], "p99");
    }
    positive(&report["http"]["batch_payments_per_sec"], "batch route");
}

/// With `--database-url`, the durable store section runs on PostgreSQL (a database of its own,
/// dropped afterwards) and reports the same rows. Skipped, visibly, without
/// `FARTHING_TEST_DATABASE_URL`.
#[test]
fn a_quick_postgres_bench_reports_the_durable_figures() {
    let Some(url) =
        farthing_testing::test_database_url("a_quick_postgres_bench_reports_the_durable_figures")
    else {
        return;
    };
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args([
            "bench",
            "--quick",
            "--json",
            "--only",
            "store",
            "--database-url",
        ])
        .arg(&url)
        .output()
        .expect("run farthing bench");
    assert!(
        output.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("bench --json prints one JSON document");
    assert_eq!(report["durable_store_backend"], "postgresql", "{report}");
    let store = report["durable_store"]
        .as_array()
        .expect("durable store rows");
    for accounts in [10_000, 10] {
        for batch in [1, 100, 8_190] {
            let row = store
                .iter()
                .find(|row| row["accounts"] == accounts && row["batch"] == batch)
                .unwrap_or_else(|| {
                    panic!("no PostgreSQL row for {accounts} accounts, batch {batch}")
                });
            let figure = row["transfers_per_sec"].as_f64().unwrap_or(0.0);
            assert!(figure > 0.0, "{accounts} accounts, batch {batch}: {figure}");
        }
    }
    let lines = String::from_utf8_lossy(&output.stderr);
    assert!(
        lines.contains("durable store (PostgreSQL), batch  8190, 10 hot accounts:"),
        "the figures are printed as they are measured: {lines}"
    );
    assert!(
        report.get("ledger_core_transfers_per_sec").is_none(),
        "--only store runs only the store"
    );
}

/// A bench that fails part-way leaves none of its data behind: a failed soak would otherwise
/// leave tens of gigabytes.
#[test]
fn a_failed_bench_removes_its_data() {
    let dir = std::env::temp_dir().join(format!("farthing-bench-fails-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["bench", "--quick", "--only", "ledger,store", "--dir"])
        .arg(&dir)
        // Nothing listens on port 1: the store part cannot connect, after the ledger part ran.
        .args(["--database-url", "postgres://postgres@127.0.0.1:1/nothing"])
        .output()
        .expect("run farthing bench");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("the directory reads")
        .map(|entry| entry.expect("an entry").file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!output.status.success(), "the bench was meant to fail");
    assert!(left.is_empty(), "the failed bench left {left:?}");
}
