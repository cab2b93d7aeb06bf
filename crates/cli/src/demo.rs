//! `farthing demo`: a server with seeded merchants and funded payers, ready to try.

use anyhow::{Context, bail};
use farthing_ledger::{Amount, Currency};
use farthing_payments::{FeeSchedule, FundingSource, Outcome};
use farthing_server::{Options, StorageChoice};
use farthing_service::{Secret, Service};
use tokio::sync::oneshot;

struct Seeded {
    name: &'static str,
    id: String,
    key: String,
}

pub async fn run(mut options: Options) -> anyhow::Result<()> {
    // On the embedded store, a demo always starts from a fresh directory, so it can be run
    // again and again; on PostgreSQL, it adds its parties to the database given.
    let mut fresh_dir = None;
    let place = match &options.storage {
        StorageChoice::Embedded(_) => {
            let dir = std::env::temp_dir().join(format!(
                "farthing-demo-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
            ));
            options.storage = StorageChoice::Embedded(dir.clone());
            let place = format!("data in {}", dir.display());
            fresh_dir = Some(dir);
            place
        }
        StorageChoice::Postgres { .. } => "data in PostgreSQL".to_string(),
    };
    let operator_key = Secret::generate_api_key("op");
    options.admin_key = Some(operator_key.expose().to_string());
    let (started_tx, started_rx) = oneshot::channel();
    let server = tokio::spawn(farthing_server::run(
        options,
        move |started| {
            let _ = started_tx.send((started.addr, started.service.clone()));
        },
        crate::shutdown_signal(),
    ));
    let (addr, service) = match started_rx.await {
        Ok(started) => started,
        Err(_) => {
            server.await??;
            bail!("the server stopped before it started");
        }
    };
    let (merchants, payers) = seed(&service).await?;
    let base = format!("http://{addr}");
    println!("Farthing demo is running at {base} ({place})");
    println!();
    println!("Operator key: {}", operator_key.expose());
    println!();
    println!("Merchants:");
    for m in &merchants {
        println!("  {:<22} {}  key {}", m.name, m.id, m.key);
    }
    println!("Payers (wallets funded through the sandbox provider):");
    for p in &payers {
        println!("  {:<22} {}  key {}", p.name, p.id, p.key);
    }
    let (payer, news, game) = (&payers[0], &merchants[0], &merchants[1]);
    println!();
    println!("Try it (copy and paste):");
    println!();
    println!("# {}'s wallet balance", payer.name);
    println!(
        "curl -s {base}/v1/payers/{}/balance -H 'Authorization: Bearer {}'",
        payer.id, payer.key
    );
    println!();
    println!(
        "# {} pays {} a quarter for one article",
        payer.name, news.name
    );
    println!(
        "curl -s -X POST {base}/v1/payments -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -H 'Idempotency-Key: article-42' -d '{{\"merchant\":\"{}\",\"amount\":\"0.25\",\"currency\":\"USD\",\"description\":\"Article: the penny returns\"}}'",
        payer.key, news.id
    );
    println!();
    println!("# … and a sword in {} for 0.0025", game.name);
    println!(
        "curl -s -X POST {base}/v1/payments -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"merchant\":\"{}\",\"amount\":\"0.0025\",\"currency\":\"USD\",\"reference\":\"item-sword\"}}'",
        payer.key, game.id
    );
    println!();
    println!("# The statement, with a running balance");
    println!(
        "curl -s {base}/v1/payers/{}/transactions -H 'Authorization: Bearer {}'",
        payer.id, payer.key
    );
    println!();
    println!("# What {} has earned, and its payments", news.name);
    println!(
        "curl -s {base}/v1/merchants/{}/balance -H 'Authorization: Bearer {}'",
        news.id, news.key
    );
    println!(
        "curl -s {base}/v1/payments -H 'Authorization: Bearer {}'",
        news.key
    );
    println!();
    println!(
        "Refund a payment with: curl -s -X POST {base}/v1/payments/<pay_id>/refunds -H 'Authorization: Bearer {}'",
        news.key
    );
    println!("API description: {base}/openapi.json   Metrics: {base}/metrics");
    println!("Press Ctrl-C to stop.");
    let result = server.await;
    drop(service);
    // A fresh directory's data is made for one run only.
    if let Some(dir) = fresh_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result??;
    Ok(())
}

async fn seed(service: &Service) -> anyhow::Result<(Vec<Seeded>, Vec<Seeded>)> {
    let usd = Currency::parse("USD").context("USD")?;
    let kes = Currency::parse("KES").context("KES")?;
    let amount = |text: &str| Amount::parse_decimal(text).expect("demo amounts are valid");
    let merchant_specs = [
        ("The Daily Penny (news)", 250, "0"),
        ("Pixel Quest (game)", 500, "0"),
        ("Ana's Studio (creator)", 100, "0"),
        ("QuickTop Airtime", 0, "0.01"),
    ];
    let mut merchants = Vec::new();
    for (name, bps, fixed) in merchant_specs {
        let fee = FeeSchedule {
            bps,
            fixed: amount(fixed),
        };
        let executed = service
            .create_merchant(name.to_string(), Some(fee), None)
            .await?;
        let Outcome::MerchantCreated(merchant) = executed.outcome else {
            bail!("could not seed merchant {name}");
        };
        merchants.push(Seeded {
            name,
            id: merchant.id.to_string(),
            key: executed
                .api_key
                .context("a new merchant has a key")?
                .expose()
                .to_string(),
        });
    }
    let payer_specs = [
        ("Amara", usd, "20"),
        ("Ben", usd, "5"),
        ("Wanjiru", kes, "500"),
    ];
    let mut payers = Vec::new();
    for (name, currency, funds) in payer_specs {
        let executed = service.create_payer(name.to_string(), None).await?;
        let Outcome::PayerCreated(payer) = executed.outcome else {
            bail!("could not seed payer {name}");
        };
        let topped = service
            .topup(
                payer.id,
                amount(funds),
                currency,
                FundingSource::Sandbox,
                None,
            )
            .await?;
        if !matches!(topped.outcome, Outcome::ToppedUp(_)) {
            bail!("could not fund payer {name}");
        }
        payers.push(Seeded {
            name,
            id: payer.id.to_string(),
            key: executed
                .api_key
                .context("a new payer has a key")?
                .expose()
                .to_string(),
        });
    }
    Ok((merchants, payers))
}
