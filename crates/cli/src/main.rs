//! `farthing`: run the server, try the demo, measure the ledger.

mod alloc;
mod bench;
mod bench_shared;
mod copy;
mod demo;
mod loadgen;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use farthing_ledger::{Amount, Currency};
use farthing_payments::{FEE_BPS_MAX, FeeSchedule};
use farthing_server::{Options, Started, StorageChoice};
use farthing_service::Config;

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

/// The shortest operator key accepted.
const ADMIN_KEY_CHARS_MIN: usize = 32;

#[derive(Parser)]
#[command(
    name = "farthing",
    version,
    about = "Farthing: self-hosted micropayments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API server.
    Serve(ServeArgs),
    /// Run the server with seeded merchants and funded payers, and print keys and curl lines.
    Demo(DemoArgs),
    /// Measure the ledger core, the durable store and the HTTP API.
    Bench(bench::BenchArgs),
    /// Copy an embedded installation, even while its server runs, and verify the copy.
    Backup(BackupArgs),
    /// Bring a PostgreSQL database's schema up to date.
    Migrate(MigrateArgs),
    /// Move an installation between a data directory and PostgreSQL, either way, verified.
    Copy(copy::CopyArgs),
}

#[derive(Args)]
struct MigrateArgs {
    /// PostgreSQL URL, e.g. postgres://farthing@127.0.0.1:5432/farthing.
    #[arg(long, env = "FARTHING_DATABASE_URL")]
    database_url: String,
}

#[derive(Args)]
struct BackupArgs {
    /// Directory of the embedded store to copy.
    #[arg(long, env = "FARTHING_DATA_DIR", default_value = "./farthing-data")]
    data_dir: PathBuf,
    /// A new directory for the copy.
    #[arg(long)]
    to: PathBuf,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FARTHING_LISTEN", default_value = "127.0.0.1:7402")]
    listen: String,
    /// Directory of the embedded store.
    #[arg(long, env = "FARTHING_DATA_DIR", default_value = "./farthing-data")]
    data_dir: PathBuf,
    /// PostgreSQL URL, e.g. postgres://farthing@127.0.0.1:5432/farthing: keep the state in
    /// PostgreSQL instead of the data directory, so that several servers can share it. The
    /// schema is brought up to date at start.
    #[arg(long, env = "FARTHING_DATABASE_URL")]
    database_url: Option<String>,
    /// With PostgreSQL: batches this server commits at once (each a transaction).
    #[arg(long, env = "FARTHING_PG_WRITERS", default_value_t = farthing_service::SHARED_WRITERS_DEFAULT)]
    pg_writers: usize,
    /// With PostgreSQL: connections this server opens at most (reads never hold the
    /// `--pg-writers` kept for batches).
    #[arg(long, env = "FARTHING_PG_CONNECTIONS", default_value_t = 16)]
    pg_connections: usize,
    /// Fee in basis points for merchants created without one.
    #[arg(long, env = "FARTHING_DEFAULT_FEE_BPS", default_value_t = 0)]
    default_fee_bps: u32,
    /// Fixed fee for merchants created without one, as a decimal amount.
    #[arg(long, env = "FARTHING_DEFAULT_FEE_FIXED", default_value = "0")]
    default_fee_fixed: String,
    /// The largest amount one request may move.
    #[arg(long, env = "FARTHING_AMOUNT_MAX", default_value = "10000")]
    amount_max: String,
    /// Currencies accepted, comma-separated ISO 4217 codes.
    #[arg(
        long,
        env = "FARTHING_CURRENCIES",
        default_value = "USD,EUR,GBP,KES,NGN,INR,JPY,BRL,ZAR"
    )]
    currencies: String,
    /// Requests per second allowed per API key (bursts of twice that); 0 for no limit.
    #[arg(long, env = "FARTHING_RATE_LIMIT", default_value_t = 5000)]
    rate_limit: u32,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    serve: ServeArgs,
}

impl ServeArgs {
    fn options(&self) -> anyhow::Result<Options> {
        let storage = match &self.database_url {
            None => StorageChoice::Embedded(self.data_dir.clone()),
            Some(url) => {
                if self.pg_writers == 0 || self.pg_connections <= self.pg_writers {
                    bail!(
                        "--pg-connections must be more than --pg-writers, which must be at least 1"
                    );
                }
                StorageChoice::Postgres {
                    url: url.clone(),
                    writers: self.pg_writers,
                    connections_max: self.pg_connections,
                }
            }
        };
        let admin_key = std::env::var("FARTHING_ADMIN_KEY")
            .ok()
            .filter(|k| !k.is_empty());
        if let Some(key) = &admin_key
            && key.chars().count() < ADMIN_KEY_CHARS_MIN
        {
            bail!("FARTHING_ADMIN_KEY must be at least {ADMIN_KEY_CHARS_MIN} characters");
        }
        if self.default_fee_bps > FEE_BPS_MAX {
            bail!("--default-fee-bps must be at most {FEE_BPS_MAX}");
        }
        let fixed = Amount::parse_decimal(&self.default_fee_fixed)
            .map_err(|e| anyhow::anyhow!("--default-fee-fixed: {e}"))?;
        let amount_max = Amount::parse_decimal(&self.amount_max)
            .map_err(|e| anyhow::anyhow!("--amount-max: {e}"))?;
        let currencies = self
            .currencies
            .split(',')
            .map(|code| {
                Currency::parse(code.trim())
                    .with_context(|| format!("--currencies: {code:?} is not an ISO 4217 code"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Options {
            listen: self.listen.clone(),
            storage,
            admin_key,
            config: Config {
                default_fee: FeeSchedule {
                    bps: self.default_fee_bps,
                    fixed,
                },
                amount_max,
                currencies,
            },
            rate_limit_per_sec: self.rate_limit,
        })
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn print_started(started: &Started) {
    if let Some(key) = &started.generated_admin_key {
        println!("operator key (shown once; keep it safe): {}", key.expose());
    }
    println!(
        "farthing listening on http://{} ({} journal records replayed)",
        started.addr, started.records_replayed
    );
}

/// Copies, then proves the copy: it replays into a state whose money is conserved.
fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    use farthing_store::Journal;
    let copied = farthing_store_embedded::backup(&args.data_dir, &args.to)
        .with_context(|| format!("backing up {}", args.data_dir.display()))?;
    let mut journal = farthing_store_embedded::FileJournal::open(&args.to)?;
    let mut state = farthing_payments::State::new();
    let replayed = journal.replay(&mut |record| {
        state.apply(&record);
    })?;
    if replayed != copied.records {
        bail!(
            "the copy replays {replayed} records but {} were copied",
            copied.records
        );
    }
    for totals in state.currency_totals() {
        if totals.posted_net != 0 || totals.pending_net != 0 {
            bail!("the copy does not balance in {}", totals.currency);
        }
    }
    println!(
        "backed up {} records ({} bytes) to {}: {} merchants, {} payers, {} payments; every currency balances",
        copied.records,
        copied.bytes,
        args.to.display(),
        state.merchant_count(),
        state.payer_count(),
        state.payment_count()
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // One line with the chain of causes; backtraces are for `FARTHING_LOG=debug` runs.
            eprintln!("farthing: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FARTHING_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let options = args.options()?;
                farthing_server::run(options, print_started, shutdown_signal()).await?;
                Ok(())
            }
            Command::Demo(args) => demo::run(args.serve.options()?).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Backup(args) => tokio::task::block_in_place(|| backup(&args)),
            Command::Copy(args) => copy::run(args).await,
            Command::Migrate(args) => {
                let mut client = farthing_store_postgres::connect(&args.database_url).await?;
                let migrated = farthing_store_postgres::migrate(&mut client).await?;
                if migrated.applied.is_empty() {
                    println!("the schema is up to date (version {})", migrated.version);
                } else {
                    for version in &migrated.applied {
                        let name = farthing_store_postgres::MIGRATIONS
                            .iter()
                            .find(|m| m.version == *version)
                            .map_or("", |m| m.name);
                        println!("applied migration {version:04} {name}");
                    }
                }
                Ok(())
            }
        }
    })
}
