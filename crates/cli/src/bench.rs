//! `farthing bench`: the ledger core in memory, the durable store, the HTTP API, and memory
//! per account. Figures go to stdout (and as JSON with `--json`).
//!
//! With `--database-url`, the durable store is PostgreSQL: each measurement gets a fresh
//! database on that server (see [`BenchDatabase`]), migrated and seeded like the embedded
//! store's, and every batch is one `apply_batch` transaction with a durable commit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use farthing_ledger::{
    AccountId, AccountKind, Amount, Currency, Ledger, Timestamp, Transfer, TransferId, TransferKind,
};
use farthing_payments::{
    BatchItemOutcome, Command, FeeSchedule, FundingSource, KeyHash, MerchantId, Outcome,
    PayCommand, PayerId, PaymentId, Record, State, TopupId,
};
use farthing_service::{CacheOptions, Config, Secret, Service, SystemClock, TimeOrderedIds};
use farthing_store::Journal;
use farthing_store_embedded::FileJournal;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::loadgen::Connection;

#[derive(Args)]
pub struct BenchArgs {
    /// Print the figures as one JSON document.
    #[arg(long)]
    json: bool,
    /// Fewer and shorter rounds: checks that every benchmark runs, not how fast.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (comma-separated: ledger, store, http, memory, soak). The soak
    /// is long and runs only when named.
    #[arg(long, default_value = "ledger,store,http,memory")]
    only: String,
    /// Soak: batch payments in all (in batches of 8,190).
    #[arg(long, default_value_t = 100_000_000)]
    soak_payments: u64,
    /// Soak: funded payers the payments are spread over.
    #[arg(long, default_value_t = 1_000_000)]
    soak_payers: usize,
    /// Soak: the cache budget in MiB, as `serve --cache-mib` takes it (the server's default
    /// unless given).
    #[arg(long, default_value_t = farthing_service::CACHE_BYTES_DEFAULT >> 20)]
    soak_cache_mib: usize,
    /// Soak: history rows between checkpoints, as `serve --checkpoint-rows` takes it (the
    /// server's default unless given).
    #[arg(long, default_value_t = farthing_service::CHECKPOINT_ROWS_DEFAULT)]
    soak_checkpoint_rows: usize,
    /// Seconds of load per HTTP measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Directory for benchmark data (a fresh subdirectory is made and removed).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measure the durable store on PostgreSQL instead of the embedded journal. The URL names
    /// a server and a database to connect to; the benchmark creates its own database next to
    /// it (`<database>_bench_<pid>`, which needs CREATEDB) and drops it when done.
    #[arg(long, env = "FARTHING_DATABASE_URL")]
    database_url: Option<String>,
}

/// A small, fast generator for benchmark inputs (not for ids or keys).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    // An empty FARTHING_DATABASE_URL means none.
    args.database_url = args.database_url.filter(|url| !url.trim().is_empty());
    let parts: Vec<&str> = args.only.split(',').map(str::trim).collect();
    let root = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("farthing-bench-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    // The data of every part goes, whether the run ends well or not: a failed soak leaves
    // tens of gigabytes.
    let measured = measure(&args, &parts, &root).await;
    let _ = std::fs::remove_dir_all(&root);
    let report = measured?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Runs the parts named, with their data under `root`, and gives the report.
async fn measure(
    args: &BenchArgs,
    parts: &[&str],
    root: &std::path::Path,
) -> anyhow::Result<Value> {
    let mut report = json!({
        "machine": machine(),
        "quick": args.quick,
    });
    if parts.contains(&"ledger") {
        let figure = tokio::task::block_in_place(|| ledger_core(args.quick));
        say(
            args,
            &format!(
                "ledger core, in memory, 8,190 per batch over 10,000 accounts: {} transfers/s",
                thousands(figure)
            ),
        );
        report["ledger_core_transfers_per_sec"] = json!(figure);
    }
    if parts.contains(&"store")
        && let Some(url) = &args.database_url
    {
        let rows = durable_postgres_section(args, url).await?;
        report["durable_store_backend"] = json!("postgresql");
        report["durable_store"] = json!(rows);
    } else if parts.contains(&"store") {
        let mut rows = Vec::new();
        for (label, accounts) in [("10,000 accounts", 10_000usize), ("10 hot accounts", 10)] {
            for batch in [1usize, 100, 8_190] {
                let dir = root.join(format!("store-{accounts}-{batch}"));
                let figure = durable_store(&dir, accounts, batch, args.quick).await?;
                let _ = std::fs::remove_dir_all(&dir);
                say(
                    args,
                    &format!(
                        "durable store, batch {batch:>5}, {label}: {} transfers/s",
                        thousands(figure)
                    ),
                );
                rows.push(
                    json!({"accounts": accounts, "batch": batch, "transfers_per_sec": figure}),
                );
            }
        }
        report["durable_store"] = json!(rows);
        let dir = root.join("recovery");
        let (payments, rate, bytes) = tokio::task::block_in_place(|| recovery(&dir, args.quick))?;
        let _ = std::fs::remove_dir_all(&dir);
        say(
            args,
            &format!(
                "recovery: {} payments replayed from a {} MiB journal at {} payments/s ({} bytes per payment on disk)",
                thousands(payments as f64),
                bytes >> 20,
                thousands(rate),
                bytes / payments.max(1) as u64
            ),
        );
        report["recovery"] =
            json!({"payments": payments, "payments_per_sec": rate.round(), "journal_bytes": bytes});
    }
    if parts.contains(&"memory") {
        let (ledger_bytes, party_bytes, payment_bytes) =
            tokio::task::block_in_place(|| memory_per_account(args.quick));
        say(
            args,
            &format!(
                "memory (heap): {ledger_bytes:.0} bytes per ledger account; {party_bytes:.0} bytes per payer with a funded wallet; {payment_bytes:.0} bytes per payment held"
            ),
        );
        report["memory_bytes_per_ledger_account"] = json!(ledger_bytes.round());
        report["memory_bytes_per_payer_with_wallet"] = json!(party_bytes.round());
        report["memory_bytes_per_payment"] = json!(payment_bytes.round());
    }
    if parts.contains(&"http") {
        report["http"] = match &args.database_url {
            Some(url) => http_postgres(args, url).await?,
            None => http(args, root).await?,
        };
    }
    if parts.contains(&"soak") {
        let memory = farthing_server::Memory {
            cache_bytes: args.soak_cache_mib << 20,
            checkpoint_rows: args.soak_checkpoint_rows.max(1),
            give_back: Some(crate::alloc::give_back),
            ..farthing_server::Memory::default()
        };
        report["soak"] =
            crate::soak::soak(root, args.soak_payments, args.soak_payers, memory, |line| {
                say(args, line)
            })
            .await?;
    }
    Ok(report)
}

fn say(args: &BenchArgs, line: &str) {
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

pub(crate) fn thousands(n: f64) -> String {
    let n = n.round() as u64;
    let text = n.to_string();
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i > 0 && (text.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    })
}

fn usd() -> Currency {
    Currency::parse("USD").expect("USD")
}

/// (a) The pure ledger: posted transfers between funded wallets, 8,190 per batch.
fn ledger_core(quick: bool) -> f64 {
    const ACCOUNTS: u64 = 10_000;
    let batches = if quick { 5 } else { 200 };
    let mut ledger = Ledger::new();
    ledger
        .create_account(AccountId(ACCOUNTS + 1), AccountKind::ExternalFunding, usd())
        .expect("fresh");
    let mut funding = Vec::new();
    for id in 1..=ACCOUNTS {
        ledger
            .create_account(AccountId(id), AccountKind::PayerWallet, usd())
            .expect("fresh");
        funding.push(Transfer {
            id: TransferId(u128::from(id) << 64),
            debit: AccountId(ACCOUNTS + 1),
            credit: AccountId(id),
            amount: Amount::from_micros(1_000_000_000_000),
            kind: TransferKind::Posted,
            linked: false,
        });
    }
    for chunk in funding.chunks(8_190) {
        ledger.apply(Timestamp(1), chunk);
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut next_id: u128 = 1;
    let prepared: Vec<Vec<Transfer>> = (0..batches)
        .map(|_| {
            (0..8_190)
                .map(|_| {
                    let debit = 1 + rng.below(ACCOUNTS as usize) as u64;
                    let mut credit = 1 + rng.below(ACCOUNTS as usize) as u64;
                    if credit == debit {
                        credit = debit % ACCOUNTS + 1;
                    }
                    next_id += 1;
                    Transfer {
                        id: TransferId(next_id),
                        debit: AccountId(debit),
                        credit: AccountId(credit),
                        amount: Amount::from_micros(1 + rng.below(1_000) as u64),
                        kind: TransferKind::Posted,
                        linked: false,
                    }
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    let mut applied = 0usize;
    for batch in &prepared {
        let outcomes = ledger.apply(Timestamp(2), batch);
        applied += outcomes.iter().filter(|o| o.is_ok()).count();
    }
    assert_eq!(applied, batches * 8_190, "every benchmark transfer applies");
    applied as f64 / started.elapsed().as_secs_f64()
}

/// Payments of 1 to 1,000 micro-units between random payers and merchants, with fresh ids.
struct RandomPayments<'a> {
    rng: Rng,
    next_id: u128,
    payers: &'a [PayerId],
    merchants: &'a [MerchantId],
}

impl<'a> RandomPayments<'a> {
    fn new(seed: u64, payers: &'a [PayerId], merchants: &'a [MerchantId]) -> Self {
        RandomPayments {
            rng: Rng(seed | 1),
            // Above every id the set-up records use.
            next_id: 1 << 100,
            payers,
            merchants,
        }
    }

    fn next(&mut self) -> PayCommand {
        self.next_id += 3;
        let id = self.next_id;
        PayCommand {
            id: PaymentId::from_u128(id),
            payer: self.payers[self.rng.below(self.payers.len())],
            merchant: self.merchants[self.rng.below(self.merchants.len())],
            amount: Amount::from_micros(1 + self.rng.below(1_000) as u64),
            currency: usd(),
            description: None,
            reference: None,
            transfer_ids: [TransferId(id + 1), TransferId(id + 2)],
        }
    }
}

/// Payers and merchants with funded wallets and merchant accounts, as journal records.
fn setup_records(payers: usize, merchants: usize) -> (Vec<Record>, Vec<PayerId>, Vec<MerchantId>) {
    let now = Timestamp(1_700_000_000_000_000);
    let mut records = Vec::new();
    let mut next: u128 = 1;
    let mut id = || {
        next += 1;
        next
    };
    let payer_ids: Vec<PayerId> = (0..payers).map(|_| PayerId::from_u128(id())).collect();
    let merchant_ids: Vec<MerchantId> = (0..merchants)
        .map(|_| MerchantId::from_u128(id()))
        .collect();
    for (n, payer) in payer_ids.iter().enumerate() {
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&payer.to_u128().to_le_bytes());
        records.push(Record {
            now,
            idempotency: None,
            command: Command::CreatePayer {
                id: *payer,
                name: format!("payer {n}"),
                key_hash: KeyHash(key),
            },
        });
        records.push(Record {
            now,
            idempotency: None,
            command: Command::Topup {
                id: TopupId::from_u128(id()),
                payer: *payer,
                amount: Amount::from_micros(1_000_000_000_000),
                currency: usd(),
                source: FundingSource::Sandbox,
                transfer_id: TransferId(id()),
            },
        });
    }
    for (n, merchant) in merchant_ids.iter().enumerate() {
        let mut key = [1u8; 32];
        key[..16].copy_from_slice(&merchant.to_u128().to_le_bytes());
        records.push(Record {
            now,
            idempotency: None,
            command: Command::CreateMerchant {
                id: *merchant,
                name: format!("merchant {n}"),
                key_hash: KeyHash(key),
                fee: FeeSchedule::ZERO,
            },
        });
        // One payment opens the merchant's account.
        records.push(Record {
            now,
            idempotency: None,
            command: Command::Pay(PayCommand {
                id: PaymentId::from_u128(id()),
                payer: payer_ids[n % payers],
                merchant: *merchant,
                amount: Amount::from_micros(1),
                currency: usd(),
                description: None,
                reference: None,
                transfer_ids: [TransferId(id()), TransferId(id())],
            }),
        });
    }
    (records, payer_ids, merchant_ids)
}

/// The embedded store as the server runs it: the service's writer over the segmented journal,
/// the engine and the cache, with checkpoints in the background. Returns the service, the
/// records it replayed and the seconds it took to open.
pub(crate) async fn bounded_service(
    dir: &std::path::Path,
    memory: farthing_server::Memory,
) -> anyhow::Result<(Service, u64, f64)> {
    let started = Instant::now();
    let (journal, checkpoints) = farthing_store_embedded::cached::open_serving(
        dir,
        memory.engine_cache_bytes,
        memory.journal_segment_bytes,
    )?;
    let opened = Service::open_cached(
        Box::new(journal),
        CacheOptions {
            checkpoints: Arc::new(checkpoints),
            cache_bytes: memory.cache_bytes,
            checkpoint_rows: memory.checkpoint_rows,
            give_back: memory.give_back,
        },
        Config::default(),
        Arc::new(SystemClock),
        Arc::new(TimeOrderedIds),
        Some(Secret::new(BENCH_OPERATOR_KEY.to_string())),
    )
    .await?;
    Ok((
        opened.service,
        opened.records_replayed,
        started.elapsed().as_secs_f64(),
    ))
}

const BENCH_OPERATOR_KEY: &str = "bench-operator-key-0123456789abcdef";

/// Submits set-up records: parties first, then their top-ups, then the rest, each phase many at
/// once (so that they commit in few batches), and checks that none was refused.
pub(crate) async fn set_up(service: &Service, records: &[Record]) -> anyhow::Result<()> {
    let phase = |record: &Record| match record.command {
        Command::CreatePayer { .. } | Command::CreateMerchant { .. } => 0,
        Command::Topup { .. } => 1,
        _ => 2,
    };
    for wanted in 0..3 {
        let records: Vec<Record> = records
            .iter()
            .filter(|record| phase(record) == wanted)
            .cloned()
            .collect();
        for chunk in records.chunks(8_190) {
            submit_all(service, chunk).await?;
        }
    }
    Ok(())
}

/// Submits `records`' commands at once, so that they commit in as few batches as the writer
/// takes, and checks that none was refused.
async fn submit_all(service: &Service, records: &[Record]) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for record in records {
        let (service, command) = (service.clone(), record.command.clone());
        tasks.spawn(async move { service.submit(command, None).await });
    }
    while let Some(done) = tasks.join_next().await {
        let executed = done??;
        if let Outcome::Rejected(rejection) = executed.outcome {
            bail!("a set-up command was refused: {rejection:?}");
        }
    }
    Ok(())
}

/// Stops a service and waits for its writer (and a checkpoint being written).
pub(crate) async fn stop(service: Service) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || service.shutdown()).await?;
    Ok(())
}

/// (b) The durable store as the server runs it: payments (one ledger transfer each, no fee)
/// submitted to the service one commit at a time (one fdatasync each), with the cache, the
/// engine and checkpoints in the background.
async fn durable_store(
    dir: &std::path::Path,
    accounts: usize,
    batch: usize,
    quick: bool,
) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    let payers = accounts / 2;
    let merchants = accounts - payers;
    let (setup, payer_ids, merchant_ids) = setup_records(payers, merchants);
    let (service, _, _) = bounded_service(dir, farthing_server::Memory::default()).await?;
    set_up(&service, &setup).await?;
    let records = durable_records(batch, quick, &payer_ids, &merchant_ids);
    let expected = records.len() * batch;
    let started = Instant::now();
    for record in records {
        let executed = service.submit(record.command, None).await?;
        let refused = match &executed.outcome {
            Outcome::Paid(_) => false,
            Outcome::PaidBatch(items) => items
                .iter()
                .any(|item| !matches!(item, BatchItemOutcome::Succeeded(_))),
            _ => true,
        };
        if refused {
            bail!("a benchmark payment was refused: {:?}", executed.outcome);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Less the one payment that opened each merchant's account.
    let payments = service.read_now(|state| state.payment_count()) - merchants;
    stop(service).await?;
    if payments != expected {
        bail!("only {payments} of {expected} benchmark payments applied");
    }
    Ok(payments as f64 / elapsed)
}

/// The records of a durable measurement: `total` payments (rounded down to whole batches) of
/// one ledger transfer each, as one `Pay` record each at batch 1 and one `PayBatch` record per
/// batch otherwise.
fn durable_records(
    batch: usize,
    quick: bool,
    payer_ids: &[PayerId],
    merchant_ids: &[MerchantId],
) -> Vec<Record> {
    let total = match (batch, quick) {
        (1, true) => 200,
        (1, false) => 3_000,
        (_, true) => 2 * batch,
        (100, false) => 50_000,
        (_, false) => 60 * batch,
    };
    let mut payments = RandomPayments::new(
        0x1234_5678_9ABC_DEF1 ^ batch as u64,
        payer_ids,
        merchant_ids,
    );
    let mut pay = || payments.next();
    let now = Timestamp(1_700_000_001_000_000);
    (0..total / batch)
        .map(|_| Record {
            now,
            idempotency: None,
            command: if batch == 1 {
                Command::Pay(pay())
            } else {
                Command::PayBatch((0..batch).map(|_| pay()).collect())
            },
        })
        .collect()
}

/// (b) on PostgreSQL: every batch size over 10,000 accounts and over 10 hot ones, each on a
/// fresh database, with one writer and with two. The rows have the embedded store's shape.
async fn durable_postgres_section(args: &BenchArgs, url: &str) -> anyhow::Result<Vec<Value>> {
    let database = BenchDatabase::new(url, "bench").await?;
    let measured = async {
        let mut rows = Vec::new();
        for (label, accounts) in [("10,000 accounts", 10_000usize), ("10 hot accounts", 10)] {
            for batch in [1usize, 100, 8_190] {
                let mut figures = Vec::new();
                for writers in [1usize, 2] {
                    let figure =
                        durable_postgres(&database, accounts, batch, writers, args.quick).await?;
                    rows.push(
                        json!({"accounts": accounts, "batch": batch, "writers": writers,
                                     "transfers_per_sec": figure}),
                    );
                    figures.push(thousands(figure));
                }
                say(
                    args,
                    &format!(
                        "durable store (PostgreSQL), batch {batch:>5}, {label}: {} transfers/s \
                         (one writer), {} (two writers, as a server runs them)",
                        figures[0], figures[1]
                    ),
                );
            }
        }
        Ok::<_, anyhow::Error>(rows)
    }
    .await;
    let dropped = database.drop_database().await;
    let rows = measured?;
    dropped?;
    Ok(rows)
}

/// A database a PostgreSQL benchmark works in: `<database>_<suffix>_<pid>` on the server the
/// given URL names, made afresh for each measurement and dropped at the end. The database the
/// URL names is only connected to, to create and drop it; nothing in it is read or changed.
pub(crate) struct BenchDatabase {
    admin: tokio_postgres::Client,
    name: String,
    pub(crate) url: String,
}

impl BenchDatabase {
    pub(crate) async fn new(url: &str, suffix: &str) -> anyhow::Result<BenchDatabase> {
        let config: tokio_postgres::Config = url
            .parse()
            .context("--database-url is not a PostgreSQL connection string")?;
        let base = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("farthing");
        let mut stem: String = base
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .map(|c| c.to_ascii_lowercase())
            .take(40)
            .collect();
        if stem.is_empty() || stem.starts_with(|c: char| c.is_ascii_digit()) {
            stem.insert_str(0, "farthing");
        }
        let name = format!("{stem}_{suffix}_{}", std::process::id());
        let admin = farthing_store_postgres::connect(url)
            .await
            .context("connecting to --database-url")?;
        Ok(BenchDatabase {
            admin,
            url: farthing_store_postgres::with_database(url, &name),
            name,
        })
    }

    /// A fresh, migrated database, and a connection to it.
    pub(crate) async fn fresh(&self) -> anyhow::Result<BenchConnection> {
        self.drop_database().await?;
        self.admin
            .batch_execute(&format!("CREATE DATABASE {}", self.name))
            .await
            .with_context(|| format!("creating the benchmark database {}", self.name))?;
        let mut connection = self.connect().await?;
        farthing_store_postgres::migrate(&mut connection.client).await?;
        Ok(connection)
    }

    /// Another connection to the database [`BenchDatabase::fresh`] made.
    pub(crate) async fn connect(&self) -> anyhow::Result<BenchConnection> {
        let (client, driver) = farthing_store_postgres::connect_driven(&self.url)
            .await
            .with_context(|| format!("connecting to the benchmark database {}", self.name))?;
        Ok(BenchConnection { client, driver })
    }

    pub(crate) async fn drop_database(&self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping the benchmark database {}", self.name))?;
        Ok(())
    }
}

/// A connection to the benchmark database, closed before the database is dropped.
pub(crate) struct BenchConnection {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl BenchConnection {
    pub(crate) async fn close(self) -> anyhow::Result<()> {
        drop(self.client);
        self.driver.await??;
        Ok(())
    }
}

/// (b) on PostgreSQL: the embedded measurement's payers, merchants and payments, applied one
/// transaction (and one durable commit) per batch. One writer applies the batches in turn with
/// `apply_batch`; more writers take the next batch as each finishes, on connections of their
/// own, sharing one `Forecast`, as `farthing serve`'s writers do.
async fn durable_postgres(
    database: &BenchDatabase,
    accounts: usize,
    batch: usize,
    writers: usize,
    quick: bool,
) -> anyhow::Result<f64> {
    let mut connection = database.fresh().await?;
    let client = &mut connection.client;
    let payers = accounts / 2;
    let merchants = accounts - payers;
    let (setup, payer_ids, merchant_ids) = setup_records(payers, merchants);
    for chunk in setup.chunks(4_096) {
        farthing_store_postgres::apply_batch(client, chunk).await?;
    }
    // Planner statistics, as autovacuum keeps them on a database in use.
    client.batch_execute("ANALYZE").await?;
    let mut records = durable_records(batch, quick, &payer_ids, &merchant_ids);
    // A server's batches never share a time: each comes a millisecond after the one before.
    // (The embedded store's figures use one time throughout, which costs it nothing; here it
    // would put every batch's rows in the middle of the list indexes rather than at their
    // newest end.)
    for (n, record) in records.iter_mut().enumerate() {
        record.now = Timestamp(record.now.0 + 1_000 * n as u64);
    }
    let mut others = Vec::new();
    for _ in 1..writers {
        others.push(database.connect().await?);
    }
    let forecast = farthing_store_postgres::Forecast::default();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    if writers == 1 {
        for record in &records {
            farthing_store_postgres::apply_batch(client, std::slice::from_ref(record)).await?;
        }
    } else {
        let mut clients: Vec<&mut tokio_postgres::Client> = vec![client];
        clients.extend(others.iter_mut().map(|other| &mut other.client));
        futures_util::future::try_join_all(
            clients
                .into_iter()
                .map(|client| durable_writer(client, &records, &next, &forecast)),
        )
        .await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    for other in others {
        other.close().await?;
    }
    let client = &mut connection.client;
    let stored: i64 = client
        .query_one("SELECT count(*) FROM payments", &[])
        .await?
        .get(0);
    connection.close().await?;
    let payments = usize::try_from(stored)?.saturating_sub(merchants);
    if payments != records.len() * batch {
        bail!(
            "only {payments} of {} benchmark payments applied",
            records.len() * batch
        );
    }
    Ok(payments as f64 / elapsed)
}

/// One of several writers: applies the next batch not yet taken until none is left.
async fn durable_writer(
    client: &mut tokio_postgres::Client,
    records: &[Record],
    next: &std::sync::atomic::AtomicUsize,
    forecast: &farthing_store_postgres::Forecast,
) -> anyhow::Result<()> {
    loop {
        let taken = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(record) = records.get(taken) else {
            return Ok(());
        };
        farthing_store_postgres::apply_batch_foreseen(
            client,
            std::slice::from_ref(record),
            forecast,
        )
        .await?;
    }
}

/// Recovery: how fast a journal replays into a fresh state, in payments per second.
fn recovery(dir: &std::path::Path, quick: bool) -> anyhow::Result<(usize, f64, u64)> {
    let _ = std::fs::remove_dir_all(dir);
    let (setup, payer_ids, merchant_ids) = setup_records(5_000, 5_000);
    let batches = if quick { 4 } else { 120 };
    {
        let mut journal = FileJournal::open(dir)?;
        journal.replay(&mut |_| {})?;
        journal.append(&setup)?;
        let mut payments = RandomPayments::new(77, &payer_ids, &merchant_ids);
        for _ in 0..batches {
            let items = (0..8_190).map(|_| payments.next()).collect();
            journal.append(&[Record {
                now: Timestamp(1_700_000_001_000_000),
                idempotency: None,
                command: Command::PayBatch(items),
            }])?;
        }
    }
    let bytes = std::fs::metadata(dir.join(farthing_store_embedded::JOURNAL_FILE))?.len();
    let started = Instant::now();
    let mut journal = FileJournal::open(dir)?;
    let mut state = State::new();
    journal.replay(&mut |record| {
        state.apply(&record);
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    let payments = state.payment_count();
    Ok((payments, payments as f64 / elapsed, bytes))
}

/// (d) Resident memory per ledger account, and per payer with a funded wallet.
fn memory_per_account(quick: bool) -> (f64, f64, f64) {
    let count: u64 = if quick { 100_000 } else { 1_000_000 };
    let (ledger, ledger_bytes) = crate::alloc::heap_bytes_of(|| {
        let mut ledger = Ledger::new();
        for id in 1..=count {
            ledger
                .create_account(AccountId(id), AccountKind::PayerWallet, usd())
                .expect("fresh");
        }
        ledger
    });
    drop(ledger);
    let payers = (count / 4) as usize;
    let (records, _, _) = setup_records(payers, 0);
    let (state, party_bytes) = crate::alloc::heap_bytes_of(|| {
        let mut state = State::new();
        for record in &records {
            state.apply(record);
        }
        state
    });
    drop(state);
    drop(records);
    // Payments: each keeps its row, its index entries, its ledger transfer and a statement line.
    let (setup, payer_ids, merchant_ids) = setup_records(1_000, 1_000);
    let mut state = State::new();
    for record in &setup {
        state.apply(record);
    }
    let payments = if quick { 100_000 } else { 1_000_000 };
    let mut random = RandomPayments::new(99, &payer_ids, &merchant_ids);
    let records: Vec<Record> = (0..payments / 1_000)
        .map(|_| Record {
            now: Timestamp(1_700_000_001_000_000),
            idempotency: None,
            command: Command::PayBatch((0..1_000).map(|_| random.next()).collect()),
        })
        .collect();
    let ((), payment_bytes) = crate::alloc::heap_bytes_of(|| {
        for record in &records {
            state.apply(record);
        }
    });
    (
        ledger_bytes as f64 / count as f64,
        party_bytes as f64 / payers as f64,
        payment_bytes as f64 / payments as f64,
    )
}

/// A server in a child process, on a fresh data directory.
/// The operator key of the servers the benches start.
pub(crate) const ADMIN_KEY: &str = "bench-operator-key-0123456789abcdef0123456789";

/// Makes the merchant the HTTP benches pay, at a 1% fee, and returns its id.
pub(crate) async fn bench_merchant(addr: &str) -> anyhow::Result<String> {
    let merchant = Connection::open(addr)
        .await?
        .request(
            "POST",
            "/v1/merchants",
            ADMIN_KEY,
            Some(br#"{"name":"bench merchant","fee_bps":100}"#),
        )
        .await?
        .json()?;
    Ok(merchant["id"].as_str().context("merchant id")?.to_string())
}

/// Makes `count` payers, each topped up with `funds`: (id, key).
pub(crate) async fn payers(
    addr: &str,
    count: usize,
    funds: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut setup = Connection::open(addr).await?;
    let mut made = Vec::new();
    for n in 0..count {
        let payer = setup
            .request(
                "POST",
                "/v1/payers",
                ADMIN_KEY,
                Some(format!(r#"{{"name":"payer {n}"}}"#).as_bytes()),
            )
            .await?
            .json()?;
        let id = payer["id"].as_str().context("payer id")?.to_string();
        let key = payer["api_key"].as_str().context("payer key")?.to_string();
        let topup = setup
            .request(
                "POST",
                &format!("/v1/payers/{id}/topups"),
                ADMIN_KEY,
                Some(
                    format!(r#"{{"amount":"{funds}","currency":"USD","source":"sandbox"}}"#)
                        .as_bytes(),
                ),
            )
            .await?;
        if topup.status != 201 {
            bail!("bench top-up failed with {}", topup.status);
        }
        made.push((id, key));
    }
    Ok(made)
}

/// A `farthing serve` child process, killed when dropped.
pub(crate) struct Child {
    pub(crate) process: tokio::process::Child,
    pub(crate) addr: String,
}

/// Starts `farthing serve` on a free port with `storage` (`--data-dir …` or `--database-url
/// …`), no rate limit and `admin_key`, and waits until it listens.
pub(crate) async fn start_server(
    storage: &[&std::ffi::OsStr],
    admin_key: &str,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut process = tokio::process::Command::new(exe)
        .args(["serve", "--listen", "127.0.0.1:0", "--rate-limit", "0"])
        .args(storage)
        .env("FARTHING_ADMIN_KEY", admin_key)
        .env_remove("FARTHING_DATABASE_URL")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = process.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await??
            .context("the server exited before listening")?;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Child { process, addr })
}

async fn http(args: &BenchArgs, root: &std::path::Path) -> anyhow::Result<Value> {
    let dir = root.join("http");
    let admin = ADMIN_KEY;
    let mut child = start_server(&["--data-dir".as_ref(), dir.as_os_str()], admin).await?;
    let addr = child.addr.clone();
    let merchant_id = bench_merchant(&addr).await?;
    let payers = payers(&addr, 256, "10000").await?;
    let payers = Arc::new(payers);
    let seconds = if args.quick { 1 } else { args.seconds };
    let mut rows = Vec::new();
    let mut before = journal_counters(&addr).await?;
    for connections in [1usize, 16, 256] {
        let round = load(
            std::slice::from_ref(&addr),
            &payers,
            &merchant_id,
            "0.0001",
            connections,
            seconds as f64,
        )
        .await?;
        if round.declined > 0 {
            bail!("{} bench payments were declined", round.declined);
        }
        let after = journal_counters(&addr).await?;
        let commits = (after.0 - before.0).max(1.0);
        let per_commit = (after.1 - before.1) / commits;
        let commit_ms = (after.2 - before.2) / commits / 1000.0;
        before = after;
        say(
            args,
            &format!(
                "HTTP single payments, {connections:>3} connections: {} payments/s, p50 {:.2} ms, p99 {:.2} ms ({per_commit:.1} records per commit, {commit_ms:.2} ms per commit)",
                thousands(round.rate),
                round.p50_ms,
                round.p99_ms
            ),
        );
        rows.push(json!({
            "connections": connections,
            "payments_per_sec": round.rate.round(),
            "p50_ms": round.p50_ms,
            "p99_ms": round.p99_ms,
            "requests": round.requests,
            "records_per_commit": per_commit,
            "commit_ms": commit_ms,
        }));
    }
    // The batch route: full batches of 8,190 from the operator, over two connections.
    let rounds = if args.quick { 2 } else { 20 };
    let mut batch_bodies = Vec::new();
    for round in 0..rounds {
        let items: Vec<String> = (0..8_190)
            .map(|n| {
                let payer = &payers[(n + round) % payers.len()].0;
                format!(r#"{{"payer":"{payer}","merchant":"{merchant_id}","amount":"0.0001","currency":"USD"}}"#)
            })
            .collect();
        batch_bodies.push(format!(r#"{{"payments":[{}]}}"#, items.join(",")));
    }
    let batch_bodies = Arc::new(batch_bodies);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for lane in 0..2 {
        let (addr, bodies) = (addr.clone(), batch_bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(&addr).await?;
            let mut done = 0usize;
            for body in bodies.iter().skip(lane).step_by(2) {
                let response = conn
                    .request("POST", "/v1/payments/batch", admin, Some(body.as_bytes()))
                    .await?;
                if response.status != 200 {
                    bail!("batch answered {}", response.status);
                }
                let results = response.json()?;
                done += results["results"]
                    .as_array()
                    .map(|r| r.iter().filter(|x| x["status"] == "succeeded").count())
                    .unwrap_or(0);
            }
            Ok::<_, anyhow::Error>(done)
        }));
    }
    let mut succeeded = 0;
    for task in tasks {
        succeeded += task.await??;
    }
    let batch_rate = succeeded as f64 / started.elapsed().as_secs_f64();
    if succeeded != rounds * 8_190 {
        bail!(
            "only {succeeded} of {} batch payments succeeded",
            rounds * 8_190
        );
    }
    say(
        args,
        &format!(
            "HTTP batch route, 8,190 per request: {} payments/s",
            thousands(batch_rate)
        ),
    );
    let _ = child.process.start_kill();
    let _ = child.process.wait().await;
    Ok(json!({ "single": rows, "batch_payments_per_sec": batch_rate.round() }))
}

/// On PostgreSQL: HTTP against one and two `farthing serve --database-url` processes on one
/// database, and hot wallets across both.
async fn http_postgres(args: &BenchArgs, url: &str) -> anyhow::Result<Value> {
    crate::bench_shared::http(url, args.quick, args.seconds, |line| say(args, line)).await
}

/// What one load round saw.
pub(crate) struct Round {
    pub(crate) rate: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// Answers received, of any status.
    pub(crate) requests: usize,
    /// 201s by payer index.
    pub(crate) succeeded: HashMap<usize, u64>,
    pub(crate) declined: u64,
}

/// `connections` clients spread over `addrs`, each paying `amount` from payer
/// `connection % payers.len()` until the deadline. 402 `insufficient_funds` is counted, any
/// other answer fails the run.
pub(crate) async fn load(
    addrs: &[String],
    payers: &Arc<Vec<(String, String)>>,
    merchant: &str,
    amount: &str,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<Round> {
    let body = Arc::new(format!(
        r#"{{"merchant":"{merchant}","amount":"{amount}","currency":"USD","description":"bench"}}"#
    ));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (addr, body, payers) = (addrs[c % addrs.len()].clone(), body.clone(), payers.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(&addr).await?;
            let payer = c % payers.len();
            let key = &payers[payer].1;
            let mut latencies: Vec<u32> = Vec::new();
            let (mut succeeded, mut declined) = (0u64, 0u64);
            while Instant::now() < deadline {
                let sent = Instant::now();
                let response = conn
                    .request("POST", "/v1/payments", key, Some(body.as_bytes()))
                    .await?;
                match response.status {
                    201 => succeeded += 1,
                    402 => declined += 1,
                    other => bail!(
                        "payment answered {other}: {}",
                        String::from_utf8_lossy(&response.body)
                    ),
                }
                latencies.push(sent.elapsed().as_micros() as u32);
            }
            Ok::<_, anyhow::Error>((payer, succeeded, declined, latencies))
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut succeeded: HashMap<usize, u64> = HashMap::new();
    let mut declined = 0;
    for task in tasks {
        let (payer, ok, no, seen) = task.await??;
        *succeeded.entry(payer).or_default() += ok;
        declined += no;
        latencies.extend(seen);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[index]) / 1000.0
    };
    Ok(Round {
        requests: latencies.len(),
        rate: succeeded.values().sum::<u64>() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        succeeded,
        declined,
    })
}

/// (commits, records, commit microseconds) from the server's `/metrics`.
async fn journal_counters(addr: &str) -> anyhow::Result<(f64, f64, f64)> {
    let mut conn = Connection::open(addr).await?;
    let response = conn.request("GET", "/metrics", ADMIN_KEY, None).await?;
    let text = String::from_utf8(response.body)?;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("farthing_journal_commits_total"),
        value("farthing_journal_records_total"),
        value("farthing_journal_commit_micros_total"),
    ))
}
