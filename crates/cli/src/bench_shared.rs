//! `farthing bench --database-url …`, HTTP part: single payments through one and through two
//! `farthing serve` processes on one PostgreSQL database, and a hot-account run across both
//! that counts deadlocks (PostgreSQL's own counter) and checks that no wallet was overspent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::bench::{ADMIN_KEY as ADMIN, BenchDatabase, Child, bench_merchant, load, payers};
use crate::loadgen::Connection;

async fn start_server(database_url: &str) -> anyhow::Result<Child> {
    crate::bench::start_server(&["--database-url".as_ref(), database_url.as_ref()], ADMIN).await
}

/// Deadlocks PostgreSQL has detected in the database so far.
async fn deadlocks(url: &str) -> anyhow::Result<i64> {
    let client = farthing_store_postgres::connect(url).await?;
    let row = client
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

async fn usd_balance(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut conn = Connection::open(addr).await?;
    let balances = conn.request("GET", path, ADMIN, None).await?.json()?;
    Ok(balances["balances"]
        .as_array()
        .and_then(|list| list.iter().find(|b| b["currency"] == "USD"))
        .and_then(|b| b["available"].as_str())
        .unwrap_or("0.00")
        .to_string())
}

/// The HTTP figures on PostgreSQL; `say` prints each as it comes.
pub async fn http(
    url: &str,
    quick: bool,
    seconds: u64,
    say: impl Fn(&str),
) -> anyhow::Result<Value> {
    let database = BenchDatabase::new(url, "bench_http").await?;
    let result = async {
        // Made and migrated here; the servers find the schema up to date.
        database.fresh().await?.close().await?;
        http_on(&database.url, quick, seconds, &say).await
    }
    .await;
    database.drop_database().await?;
    result
}

async fn http_on(
    url: &str,
    quick: bool,
    seconds: u64,
    say: &impl Fn(&str),
) -> anyhow::Result<Value> {
    let seconds = if quick { 1.0 } else { seconds as f64 };
    let first = start_server(url).await?;
    let merchant = bench_merchant(&first.addr).await?;
    let spread = Arc::new(payers(&first.addr, 256, "10000").await?);
    let mut rows = Vec::new();

    let mut servers = vec![first];
    for processes in [1usize, 2] {
        if servers.len() < processes {
            servers.push(start_server(url).await?);
        }
        let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
        for connections in [16usize, 256] {
            let round = load(&addrs, &spread, &merchant, "0.0001", connections, seconds).await?;
            say(&format!(
                "PostgreSQL HTTP single payments, {processes} process(es), {connections:>3} connections: {} payments/s, p50 {:.2} ms, p99 {:.2} ms",
                crate::bench::thousands(round.rate),
                round.p50_ms,
                round.p99_ms
            ));
            rows.push(json!({
                "processes": processes,
                "connections": connections,
                "payments_per_sec": round.rate.round(),
                "p50_ms": round.p50_ms,
                "p99_ms": round.p99_ms,
            }));
        }
    }

    // Ten hot wallets of 20.00, paid 0.01 at a time by 256 connections over both processes
    // until every wallet is empty: exactly 2,000 payments fit in each.
    let addrs: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    let hot = Arc::new(payers(&addrs[0], 10, "20").await?);
    let merchant_before =
        usd_balance(&addrs[0], &format!("/v1/merchants/{merchant}/balance")).await?;
    let deadlocks_before = deadlocks(url).await?;
    let mut hot_round = load(&addrs, &hot, &merchant, "0.01", 256, 1.0).await?;
    // Keep going until every wallet is declined: then no more money can move.
    let mut total_ok: u64 = hot_round.succeeded.values().sum();
    let run_started = Instant::now();
    while hot_round.declined == 0 || total_ok < 20_000 {
        if run_started.elapsed() > Duration::from_secs(120) {
            bail!("the hot wallets were not emptied within two minutes ({total_ok} payments)");
        }
        let more = load(&addrs, &hot, &merchant, "0.01", 256, 1.0).await?;
        for (payer, count) in more.succeeded {
            *hot_round.succeeded.entry(payer).or_default() += count;
        }
        hot_round.declined += more.declined;
        total_ok = hot_round.succeeded.values().sum();
        if more.declined > 0 && total_ok >= 20_000 {
            break;
        }
    }
    let hot_elapsed = run_started.elapsed().as_secs_f64() + 1.0;
    let deadlocks_seen = deadlocks(url).await? - deadlocks_before;
    let mut overspent = Vec::new();
    for (index, (id, _)) in hot.iter().enumerate() {
        let paid = hot_round.succeeded.get(&index).copied().unwrap_or(0);
        let balance = usd_balance(&addrs[0], &format!("/v1/payers/{id}/balance")).await?;
        if paid != 2_000 || balance != "0.00" {
            overspent.push(format!("{id}: {paid} payments, balance {balance}"));
        }
    }
    let merchant_after =
        usd_balance(&addrs[0], &format!("/v1/merchants/{merchant}/balance")).await?;
    // 20,000 payments of 0.01 less the 1% fee: the merchant gained exactly 198.00.
    let micros = |text: &str| {
        farthing_ledger::Amount::parse_decimal(text)
            .map(farthing_ledger::Amount::micros)
            .map_err(|error| anyhow::anyhow!("a balance of {text:?}: {error:?}"))
    };
    let gained = micros(&merchant_after)?
        .checked_sub(micros(&merchant_before)?)
        .context("the merchant's balance went down")?;
    if gained != 198_000_000 {
        overspent.push(format!(
            "the merchant gained {gained} micro-units, not 198,000,000"
        ));
    }
    say(&format!(
        "PostgreSQL hot wallets, 2 processes, 256 connections on 10 wallets: {} payments in {:.1} s, {} declined, {deadlocks_seen} deadlocks, {} wallets overspent or short (merchant {merchant_before} -> {merchant_after})",
        crate::bench::thousands(total_ok as f64),
        hot_elapsed,
        hot_round.declined,
        overspent.len()
    ));
    if !overspent.is_empty() {
        bail!("wallets overspent or short: {overspent:?}");
    }
    for mut server in servers {
        let _ = server.process.start_kill();
        let _ = server.process.wait().await;
    }
    Ok(json!({
        "single": rows,
        "hot_two_processes": {
            "payments": total_ok,
            "declined": hot_round.declined,
            "deadlocks": deadlocks_seen,
            "wallets_overspent": overspent.len(),
        },
    }))
}
