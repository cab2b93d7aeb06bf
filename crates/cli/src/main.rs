//! `farthing`: run the server, try the demo, measure the ledger.

mod alloc;
mod bench;
mod bench_shared;
mod copy;
mod demo;
mod loadgen;
mod soak;

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

/// What `serve --help` says of the settings that have no flag.
const SERVE_ENVIRONMENT: &str = "\
Environment:
  FARTHING_ADMIN_KEY  The operator key: 32 or more visible ASCII characters, no spaces.
                      Unset on a first start (embedded store), a key is made and printed
                      once; only its hash is kept. Setting a new value replaces the
                      operator key at the next start, and the old one stops working
                      (on PostgreSQL, on other servers within 5 seconds). A key that is
                      already a merchant's or payer's is refused.
  FARTHING_LOG        Log filter, for example warn (the default), info, or
                      farthing_server=debug,warn. Logs go to standard error.
Every flag above can also be set by the variable shown beside it.";

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
    #[command(after_help = SERVE_ENVIRONMENT)]
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
    #[command(flatten)]
    edge: EdgeArgs,
    /// Run on a test clock that the operator moves forward with POST /v1/test_clock, for
    /// trying periods, windows and expiries without waiting (as Stripe's test clocks). Time
    /// never goes back, across restarts too. Not for production.
    #[arg(long, env = "FARTHING_TEST_CLOCK", value_parser = clap::builder::BoolishValueParser::new())]
    test_clock: bool,
    /// Embedded store: about how many MiB of payers, accounts and history to keep in memory
    /// beyond what changed since the last checkpoint; the rest is read from disk. Past it,
    /// the least recently used rows go, a few at a time. Memory stays bounded by this, not by
    /// history.
    #[arg(long, env = "FARTHING_CACHE_MIB", default_value_t = farthing_service::CACHE_BYTES_DEFAULT >> 20)]
    cache_mib: usize,
    /// Embedded store: history rows (a payment makes one) between checkpoints, which write
    /// the state to disk in the background; a restart replays only the journal after the last.
    #[arg(long, env = "FARTHING_CHECKPOINT_ROWS", default_value_t = farthing_service::CHECKPOINT_ROWS_DEFAULT)]
    checkpoint_rows: usize,
    /// Embedded store: the size at which the journal starts a new segment file; segments a
    /// checkpoint holds are removed whole.
    #[arg(long, env = "FARTHING_JOURNAL_SEGMENT_BYTES", default_value_t = farthing_store_embedded::SEGMENT_BYTES_MAX, hide = true)]
    journal_segment_bytes: u64,
}

/// Limits at the edge: abuse, timeouts, metrics.
#[derive(Args, Clone)]
struct EdgeArgs {
    /// Requests with a missing or wrong API key allowed per minute from one address; beyond
    /// that the address gets 429 for a while, whatever key it sends.
    #[arg(long, env = "FARTHING_AUTH_FAILURES_PER_MIN", default_value_t = farthing_server::AUTH_FAILURES_PER_MIN_DEFAULT)]
    auth_failures_per_min: u32,
    /// Also serve /metrics without a key on this address (for example 127.0.0.1:9402, for a
    /// Prometheus scraper); on the API's address /metrics needs the operator key.
    #[arg(long, env = "FARTHING_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Connections served at once; more wait until one closes.
    #[arg(long, env = "FARTHING_CONNECTIONS_MAX", default_value_t = farthing_server::CONNECTIONS_MAX_DEFAULT)]
    connections_max: usize,
    /// Seconds a client has to send a request's headers, and that a kept-alive connection may
    /// stay idle.
    #[arg(long, env = "FARTHING_HEADER_TIMEOUT_SECS", default_value_t = farthing_server::HEADER_TIMEOUT_DEFAULT.as_secs())]
    header_timeout_secs: u64,
    /// Seconds within which a whole request, body included, is answered (else 408).
    #[arg(long, env = "FARTHING_REQUEST_TIMEOUT_SECS", default_value_t = farthing_server::REQUEST_TIMEOUT_DEFAULT.as_secs())]
    request_timeout_secs: u64,
    /// Seconds in-flight requests get to finish on SIGTERM before connections are closed.
    #[arg(long, env = "FARTHING_DRAIN_TIMEOUT_SECS", default_value_t = farthing_server::DRAIN_TIMEOUT_DEFAULT.as_secs())]
    drain_timeout_secs: u64,
}

#[derive(Args)]
struct DemoArgs {
    /// Address to listen on.
    #[arg(long, env = "FARTHING_LISTEN", default_value = "127.0.0.1:7402")]
    listen: String,
    /// PostgreSQL URL of an empty database to run the demo on (it refuses a database that
    /// holds data); without it the demo keeps its data in a fresh temporary directory and
    /// removes it when stopped.
    #[arg(long, env = "FARTHING_DATABASE_URL")]
    database_url: Option<String>,
}

impl DemoArgs {
    /// The demo runs as `serve` does with every default, on its own place for data.
    fn serve_args(&self) -> ServeArgs {
        let mut args = ServeArgs::parse_from(["serve"]);
        args.listen = self.listen.clone();
        args.database_url = self.database_url.clone();
        args
    }
}

/// `serve`'s arguments on their own, for the demo's defaults.
#[derive(Parser)]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    fn parse_from<const N: usize>(argv: [&str; N]) -> ServeArgs {
        ServeOnly::parse_from(argv).args
    }
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
        if let Some(key) = &admin_key {
            check_admin_key(key)?;
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
            test_clock: self.test_clock,
            memory: farthing_server::Memory {
                cache_bytes: self.cache_mib << 20,
                checkpoint_rows: self.checkpoint_rows.max(1),
                journal_segment_bytes: self.journal_segment_bytes.max(4096),
                give_back: Some(alloc::give_back),
                ..farthing_server::Memory::default()
            },
            auth_failures_per_min: self.edge.auth_failures_per_min,
            metrics_listen: self.edge.metrics_listen.clone(),
            edge: farthing_server::EdgeLimits {
                connections_max: self.edge.connections_max,
                header_timeout: seconds("--header-timeout-secs", self.edge.header_timeout_secs)?,
                request_timeout: seconds("--request-timeout-secs", self.edge.request_timeout_secs)?,
                drain_timeout: std::time::Duration::from_secs(self.edge.drain_timeout_secs),
            },
        })
    }
}

fn seconds(flag: &str, secs: u64) -> anyhow::Result<std::time::Duration> {
    if secs == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// An operator key is sent in a header by hand: it must survive being pasted, so it is made
/// of visible ASCII characters only (a trailing space or newline would make a key that can
/// never log in), and long enough not to be guessed.
fn check_admin_key(key: &str) -> anyhow::Result<()> {
    // The offending character is not named: it is part of a secret.
    if key.chars().any(|c| !c.is_ascii_graphic()) {
        bail!(
            "FARTHING_ADMIN_KEY must be made of visible ASCII characters only: it holds a \
             space, a control character or a character beyond ASCII"
        );
    }
    if key.len() < ADMIN_KEY_CHARS_MIN {
        bail!("FARTHING_ADMIN_KEY must be at least {ADMIN_KEY_CHARS_MIN} characters");
    }
    Ok(())
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
        println!(
            "  (lost it? stop the server and start it with FARTHING_ADMIN_KEY set to a new key of 32+ characters: it replaces this one)"
        );
    }
    println!(
        "farthing listening on http://{} ({} journal records replayed)",
        started.addr, started.records_replayed
    );
    if let Some(addr) = started.metrics_addr {
        println!("metrics without a key on http://{addr}/metrics");
    }
}

/// Copies, then proves the copy: it opens and replays as a server would, and its money is
/// conserved. A server running on the data directory makes the copy itself (only it can read
/// its engine whole while it changes); otherwise this process opens the store and does.
fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let copied = match farthing_store_embedded::backup::ask_running_server(&args.data_dir, &args.to)
        .with_context(|| {
            format!(
                "asking the server on {} for a backup",
                args.data_dir.display()
            )
        })? {
        Some(copied) => copied,
        None => farthing_store_embedded::backup(&args.data_dir, &args.to)
            .with_context(|| format!("backing up {}", args.data_dir.display()))?,
    };
    let verified = farthing_store_embedded::cached::verify(&args.to)
        .with_context(|| format!("verifying the copy in {}", args.to.display()))?;
    if verified.end_position != copied.first_position + copied.records {
        bail!(
            "the copy replays to position {} but records up to position {} were copied",
            verified.end_position,
            copied.first_position + copied.records
        );
    }
    if let Some(currency) = verified.unbalanced.first() {
        bail!("the copy does not balance in {currency}");
    }
    println!(
        "backed up {} records ({} bytes) to {}: {} merchants, {} payers, {} payments; every currency balances",
        verified.end_position,
        copied.bytes,
        args.to.display(),
        verified.merchants,
        verified.payers,
        verified.payments
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    alloc::settle();
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
            Command::Demo(args) => demo::run(args.serve_args().options()?).await,
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
