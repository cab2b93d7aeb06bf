//! `farthing copy`: moves an installation between the embedded store and PostgreSQL, in either
//! direction, keeping every id, time, total, list and statement line, and reads the target
//! back and compares it with the source item by item before it says the copy is done.
//!
//! - **Embedded to PostgreSQL**: the installation is read as a whole state (the engine's rows,
//!   then the journal after its last checkpoint), and its `State::export` items are applied to
//!   the database as `Command::Import` records with `apply_batch`; every one must be taken.
//! - **PostgreSQL to embedded**: the database is read from one snapshot as `State::export`'s
//!   items and written as `Command::Import` records, then the new store is opened and
//!   replayed as a server would.
//!
//! Either way the target must hold nothing yet, and the data directory must not be in use by
//! a server (its lock file is taken for the whole copy).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use farthing_ledger::{AccountKind, Currency, Timestamp};
use farthing_payments::{Command, HoldKind, Imported, Outcome, Record, State, codec};
use farthing_store::{Journal, StoreError};
use farthing_store_embedded::{
    ENGINE_DIR, EngineCheckpoints, JOURNAL_FILE, RECORD_BYTES_MAX, SEGMENTS_DIR, SegmentedJournal,
};
use farthing_store_postgres::export::{self, Items, chunk_may_end_between};
use farthing_store_postgres::{
    MIGRATIONS, apply_batch, connect, holds_data, migrate, schema_version,
};
use tokio_postgres::Client;

/// Items in one import record, about: a record ends at the first place after this many where
/// it may.
const ITEMS_PER_RECORD: usize = 10_000;
/// Rows read from PostgreSQL at a time.
const ROWS_PER_READ: usize = 10_000;

#[derive(Args)]
pub struct CopyArgs {
    /// The installation to copy: a data directory, or a postgres:// URL.
    #[arg(long)]
    from: String,
    /// Where it goes: an empty PostgreSQL database (postgres://…) or a new data directory.
    #[arg(long)]
    to: String,
}

pub async fn run(args: CopyArgs) -> anyhow::Result<()> {
    match (is_postgres(&args.from), is_postgres(&args.to)) {
        (false, true) => embedded_to_postgres(Path::new(&args.from), &args.to).await,
        (true, false) => postgres_to_embedded(&args.from, Path::new(&args.to)).await,
        (true, true) | (false, false) => bail!(
            "exactly one of --from and --to must be a postgres:// URL; the other is a data \
             directory"
        ),
    }
}

fn is_postgres(place: &str) -> bool {
    place.starts_with("postgres://") || place.starts_with("postgresql://")
}

/// Opens a data directory's store, taking its lock.
fn open_store(dir: &Path) -> anyhow::Result<(SegmentedJournal, EngineCheckpoints)> {
    match farthing_store_embedded::cached::open(dir, 64 << 20) {
        Ok(store) => Ok(store),
        Err(StoreError::Locked(_)) => bail!(
            "{} is in use by a running server; stop it before copying",
            dir.display()
        ),
        Err(error) => Err(error).with_context(|| format!("opening the store in {}", dir.display())),
    }
}

/// Whether `dir` holds a Farthing store of any layout.
fn holds_store(dir: &Path) -> bool {
    dir.join(JOURNAL_FILE).is_file()
        || dir.join(SEGMENTS_DIR).is_dir()
        || dir.join(ENGINE_DIR).is_dir()
}

/// The whole state of the store in `dir` (the engine's rows, then the journal after them), and
/// the outcome of each record replayed.
fn whole_state(dir: &Path) -> anyhow::Result<(State, Vec<Outcome>)> {
    let (mut journal, checkpoints) = open_store(dir)?;
    let mut state = State::whole_from_disk(&**checkpoints.engine())
        .with_context(|| format!("reading the engine in {}", dir.display()))?;
    let mut outcomes = Vec::new();
    journal.replay_from(state.records_applied(), &mut |record| {
        outcomes.push(state.apply(&record));
    })?;
    Ok((state, outcomes))
}

/// Turns items, in export order, into import records: each ends where a later copy may cut
/// a batch, and carries the latest time of any item so far (the state goes on from the latest
/// time the installation had seen, and a database takes batches in time order).
#[derive(Default)]
struct Imports {
    chunk: Vec<Imported>,
    now: Timestamp,
    items: u64,
    records: u64,
}

impl Imports {
    fn push(&mut self, item: Imported) -> anyhow::Result<Option<Record>> {
        let full = self.chunk.len() >= ITEMS_PER_RECORD
            && self
                .chunk
                .last()
                .is_some_and(|last| chunk_may_end_between(last, &item));
        let record = if full { Some(self.take()?) } else { None };
        self.now = self.now.max(time_of(&item));
        self.chunk.push(item);
        Ok(record)
    }

    fn finish(&mut self) -> anyhow::Result<Option<Record>> {
        if self.chunk.is_empty() {
            Ok(None)
        } else {
            self.take().map(Some)
        }
    }

    fn take(&mut self) -> anyhow::Result<Record> {
        let items = std::mem::take(&mut self.chunk);
        let count = items.len();
        let record = Record {
            now: self.now,
            idempotency: None,
            command: Command::Import(items),
        };
        let mut bytes = Vec::new();
        codec::encode(&record, &mut bytes);
        if bytes.len() > RECORD_BYTES_MAX {
            bail!(
                "an import record of {count} items takes {} bytes, more than a journal record \
                 may ({RECORD_BYTES_MAX})",
                bytes.len()
            );
        }
        self.items += count as u64;
        self.records += 1;
        Ok(record)
    }
}

async fn connected(url: &str) -> anyhow::Result<Client> {
    connect(url)
        .await
        .context("connecting to the PostgreSQL database")
}

// =============================================================================================
// Embedded to PostgreSQL
// =============================================================================================

async fn embedded_to_postgres(dir: &Path, url: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    if !holds_store(dir) {
        bail!("{} holds no Farthing journal", dir.display());
    }
    let state = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || whole_state(&dir))
            .await??
            .0
    };
    let mut client = connected(url).await?;
    migrate(&mut client)
        .await
        .context("bringing the target database's schema up to date")?;
    if holds_data(&client).await? {
        bail!("the target database already holds Farthing data; copy into an empty database");
    }
    let partial = "the database may now hold part of the installation: drop and recreate it \
                   before copying again";
    let mut imports = Imports::default();
    let mut records = Vec::new();
    for item in state.export() {
        records.extend(imports.push(item)?);
        if records.len() >= 8 {
            import_into(&mut client, &records).await.context(partial)?;
            records.clear();
        }
    }
    records.extend(imports.finish()?);
    import_into(&mut client, &records).await.context(partial)?;
    let copy_secs = started.elapsed().as_secs_f64();

    let snapshot = export::snapshot(&mut client).await?;
    let summary = compare(
        Side::Memory(Box::new(state.export())),
        Side::Database(snapshot.items()),
    )
    .await
    .with_context(|| format!("the database does not match {}; {partial}", dir.display()))?;
    snapshot.close().await?;
    println!(
        "copied {} items from {} to PostgreSQL as {} import records in {copy_secs:.1} s",
        thousands(imports.items),
        dir.display(),
        imports.records
    );
    summary.print(started);
    Ok(())
}

/// Applies import records to PostgreSQL; every one must be taken whole.
async fn import_into(client: &mut Client, records: &[Record]) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let outcomes = apply_batch(client, records)
        .await
        .context("applying import records")?;
    for (record, outcome) in records.iter().zip(&outcomes) {
        let Command::Import(items) = &record.command else {
            unreachable!("only imports are written");
        };
        if *outcome != (Outcome::Imported { count: items.len() }) {
            bail!(
                "PostgreSQL refused an import of {} items: {outcome:?}",
                items.len()
            );
        }
    }
    Ok(())
}

// =============================================================================================
// PostgreSQL to embedded
// =============================================================================================

async fn postgres_to_embedded(url: &str, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let journal = {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<SegmentedJournal> {
            let (mut journal, checkpoints) = open_store(&dir)?;
            let records = journal.replay(&mut |_| {})?;
            let checkpointed = checkpoints.engine().position();
            if records > 0 || checkpointed > 0 {
                bail!(
                    "{} already holds a journal of {} records; copy into a new data directory",
                    dir.display(),
                    records.max(checkpointed)
                );
            }
            Ok(journal)
        })
        .await??
    };
    let mut client = connected(url).await?;
    let version = schema_version(&client).await?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if version != latest {
        bail!(
            "the source database's schema is at version {version}, this build's is {latest}: \
             run `farthing migrate` with the matching build first"
        );
    }
    let snapshot = export::snapshot(&mut client).await?;
    let (records, items, copy_secs, summary) =
        match write_and_verify(&snapshot, journal, dir, started).await {
            Ok(done) => done,
            Err(error) => {
                // A copy that failed or does not match must not look like an installation to
                // serve.
                let _ = std::fs::remove_dir_all(dir.join(SEGMENTS_DIR));
                let _ = std::fs::remove_dir_all(dir.join(ENGINE_DIR));
                return Err(error.context(format!(
                    "the copy failed and {} was left without a journal",
                    dir.display()
                )));
            }
        };
    snapshot.close().await?;
    println!(
        "copied {} items from PostgreSQL to {} as {records} journal records in {copy_secs:.1} s",
        thousands(items),
        dir.display()
    );
    summary.print(started);
    Ok(())
}

/// Writes the snapshot into `journal` as import records, then opens the data directory afresh,
/// replays it as a server would, and compares the state with a second pass over the snapshot.
/// Returns the records and items written, the seconds taken to write them, and the summary.
async fn write_and_verify(
    snapshot: &export::Snapshot<'_>,
    mut journal: SegmentedJournal,
    dir: &Path,
    started: Instant,
) -> anyhow::Result<(u64, u64, f64, Summary)> {
    let (records, items) = write_imports(snapshot.items(), &mut journal).await?;
    let copy_secs = started.elapsed().as_secs_f64();
    drop(journal);
    let state = {
        let dir: PathBuf = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> anyhow::Result<State> {
            let (state, outcomes) = whole_state(&dir)?;
            if let Some(outcome) = outcomes
                .iter()
                .find(|outcome| !matches!(outcome, Outcome::Imported { .. }))
            {
                bail!("the new journal does not replay: an import answered {outcome:?}");
            }
            Ok(state)
        })
        .await??
    };
    let summary = compare(
        Side::Database(snapshot.items()),
        Side::Memory(Box::new(state.export())),
    )
    .await
    .with_context(|| format!("the copy in {} does not match the database", dir.display()))?;
    Ok((records, items, copy_secs, summary))
}

/// Writes every item as import records, and returns how many records and items were written.
async fn write_imports(
    mut items: Items<'_>,
    journal: &mut SegmentedJournal,
) -> anyhow::Result<(u64, u64)> {
    let mut imports = Imports::default();
    loop {
        let read = items
            .next_chunk(ROWS_PER_READ)
            .await
            .context("reading the source database")?;
        if read.is_empty() {
            break;
        }
        for item in read {
            if let Some(record) = imports.push(item)? {
                append(journal, record)?;
            }
        }
    }
    if let Some(record) = imports.finish()? {
        append(journal, record)?;
    }
    Ok((imports.records, imports.items))
}

fn append(journal: &mut SegmentedJournal, record: Record) -> anyhow::Result<()> {
    tokio::task::block_in_place(|| journal.append(&[record])).context("writing the new journal")
}

/// The time an item was made, where it has one.
fn time_of(item: &Imported) -> Timestamp {
    match item {
        Imported::OperatorKey(_) | Imported::Account { .. } => Timestamp(0),
        Imported::Merchant { merchant, .. } => merchant.created_at,
        Imported::Payer { payer, .. } => payer.created_at,
        Imported::Transfer(record) => record.timestamp,
        Imported::Payment(payment) => payment.created_at,
        Imported::Topup(topup) => topup.created_at,
        Imported::Refund(refund) => refund.created_at,
        Imported::Entry { entry, .. } => entry.created_at,
        Imported::Idempotency(row) => row.made,
        // A settled hold's time is when it settled.
        Imported::Row(row) => row
            .decode::<HoldKind>()
            .and_then(Result::ok)
            .and_then(|row| row.hold.resolved_at)
            .unwrap_or(Timestamp(0)),
    }
}

// =============================================================================================
// Verification
// =============================================================================================

/// One side of a comparison: a state in memory or a database snapshot.
enum Side<'a> {
    Memory(Box<dyn Iterator<Item = Imported> + 'a>),
    Database(Items<'a>),
}

impl Side<'_> {
    async fn next_chunk(&mut self) -> anyhow::Result<Vec<Imported>> {
        match self {
            Side::Memory(items) => Ok(items.by_ref().take(ROWS_PER_READ).collect()),
            Side::Database(items) => Ok(items.next_chunk(ROWS_PER_READ).await?),
        }
    }
}

/// Compares two exports item by item, a chunk at a time, and sums up the source.
async fn compare(mut source: Side<'_>, mut target: Side<'_>) -> anyhow::Result<Summary> {
    let mut summary = Summary::default();
    let (mut from, mut to) = (VecDeque::new(), VecDeque::new());
    let (mut source_done, mut target_done) = (false, false);
    loop {
        if from.is_empty() && !source_done {
            let chunk = source.next_chunk().await?;
            source_done = chunk.is_empty();
            from.extend(chunk);
        }
        if to.is_empty() && !target_done {
            let chunk = target.next_chunk().await?;
            target_done = chunk.is_empty();
            to.extend(chunk);
        }
        while let (Some(a), Some(b)) = (from.front(), to.front()) {
            if a != b {
                bail!(
                    "copy NOT verified: item {} differs\n  source: {a:?}\n  target: {b:?}",
                    summary.items + 1
                );
            }
            summary.count(a);
            from.pop_front();
            to.pop_front();
        }
        match (from.front(), to.front()) {
            (None, None) if source_done && target_done => return Ok(summary),
            (Some(a), None) if target_done => bail!(
                "copy NOT verified: the target lacks item {} and what follows: {a:?}",
                summary.items + 1
            ),
            (None, Some(b)) if source_done => bail!(
                "copy NOT verified: the target holds more than the source, from item {}: {b:?}",
                summary.items + 1
            ),
            _ => {}
        }
    }
}

/// What an installation holds, counted as it is compared.
#[derive(Default, Debug)]
struct Summary {
    items: u64,
    operator_key: bool,
    merchants: u64,
    payers: u64,
    accounts: u64,
    transfers: u64,
    payments: u64,
    topups: u64,
    refunds: u64,
    rows: u64,
    lines: u64,
    idempotency_keys: u64,
    /// Posted balances by currency and account kind, in micro-units.
    balances: BTreeMap<Currency, Balances>,
}

#[derive(Default, Debug)]
struct Balances {
    wallets: i128,
    merchants: i128,
    fees: i128,
    /// What came in from outside: the negated balance of the external funding account.
    funded: i128,
}

impl Summary {
    fn count(&mut self, item: &Imported) {
        self.items += 1;
        match item {
            Imported::OperatorKey(_) => self.operator_key = true,
            Imported::Merchant { .. } => self.merchants += 1,
            Imported::Payer { .. } => self.payers += 1,
            Imported::Account { account, .. } => {
                self.accounts += 1;
                let balances = self.balances.entry(account.currency).or_default();
                let balance = account.posted_balance();
                match account.kind {
                    AccountKind::PayerWallet => balances.wallets += balance,
                    AccountKind::Merchant => balances.merchants += balance,
                    AccountKind::PlatformFees => balances.fees += balance,
                    AccountKind::ExternalFunding => balances.funded -= balance,
                }
            }
            Imported::Transfer(_) => self.transfers += 1,
            Imported::Payment(_) => self.payments += 1,
            Imported::Topup(_) => self.topups += 1,
            Imported::Refund(_) => self.refunds += 1,
            Imported::Entry { .. } => self.lines += 1,
            Imported::Idempotency(_) => self.idempotency_keys += 1,
            Imported::Row(_) => self.rows += 1,
        }
    }

    fn print(&self, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        let per_sec = if secs > 0.0 {
            (self.items as f64 / secs) as u64
        } else {
            self.items
        };
        println!(
            "copy verified: source and target are identical item by item: {} items (operator \
             key {}, merchants {}, payers {}, accounts {}, transfers {}, payments {}, top-ups {}, \
             refunds {}, state rows {}, statement lines {}, idempotency keys {}); {secs:.1} s in all, {} \
             items/s",
            thousands(self.items),
            u8::from(self.operator_key),
            thousands(self.merchants),
            thousands(self.payers),
            thousands(self.accounts),
            thousands(self.transfers),
            thousands(self.payments),
            thousands(self.topups),
            thousands(self.refunds),
            thousands(self.rows),
            thousands(self.lines),
            thousands(self.idempotency_keys),
            thousands(per_sec),
        );
        for (currency, b) in &self.balances {
            println!(
                "  {currency}: {} held (wallets {}, merchants {}, fees {}), {} funded",
                decimal(b.wallets + b.merchants + b.fees),
                decimal(b.wallets),
                decimal(b.merchants),
                decimal(b.fees),
                decimal(b.funded),
            );
        }
    }
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Micro-units as a decimal amount: at least two decimals, at most six.
fn decimal(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let micros = micros.unsigned_abs();
    let digits = format!("{:06}", micros % 1_000_000);
    let trimmed = digits.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &digits[..2]
    } else {
        trimmed
    };
    format!("{sign}{}.{shown}", micros / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_print_as_decimals_of_two_to_six_places() {
        assert_eq!(decimal(0), "0.00");
        assert_eq!(decimal(1_500_000), "1.50");
        assert_eq!(decimal(2_500), "0.0025");
        assert_eq!(decimal(-1_000_001), "-1.000001");
    }

    #[test]
    fn counts_print_with_thousands_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    fn keys(bytes: &[u8]) -> Vec<Imported> {
        bytes
            .iter()
            .map(|b| Imported::OperatorKey(farthing_payments::KeyHash([*b; 32])))
            .collect()
    }

    async fn compared(source: &[u8], target: &[u8]) -> anyhow::Result<Summary> {
        compare(
            Side::Memory(Box::new(keys(source).into_iter())),
            Side::Memory(Box::new(keys(target).into_iter())),
        )
        .await
    }

    #[tokio::test]
    async fn a_comparison_passes_only_when_every_item_is_the_same_in_the_same_order() {
        let many: Vec<u8> = (0..=255).cycle().take(3 * ROWS_PER_READ + 7).collect();
        assert_eq!(
            compared(&many, &many).await.expect("the same").items,
            many.len() as u64
        );
        assert_eq!(compared(&[], &[]).await.expect("both empty").items, 0);
        let mut changed = many.clone();
        changed[2 * ROWS_PER_READ + 3] ^= 1;
        let error = compared(&many, &changed)
            .await
            .expect_err("one item differs");
        assert!(
            error
                .to_string()
                .contains(&format!("item {} differs", 2 * ROWS_PER_READ + 4))
        );
        let error = compared(&many, &many[..many.len() - 1])
            .await
            .expect_err("one short");
        assert!(error.to_string().contains("lacks"), "{error}");
        let error = compared(&many[1..], &many).await.expect_err("shifted");
        assert!(error.to_string().contains("differs"), "{error}");
        let error = compared(&[1, 2], &[1, 2, 3]).await.expect_err("one more");
        assert!(error.to_string().contains("holds more"), "{error}");
    }

    #[test]
    fn exactly_one_side_is_a_postgres_url() {
        assert!(is_postgres("postgres://u@h/db"));
        assert!(is_postgres("postgresql://u@h/db"));
        assert!(!is_postgres("./farthing-data"));
        assert!(!is_postgres("postgres-data"));
    }
}
