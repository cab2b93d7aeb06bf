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

/// A directory made for one demo, removed when the demo ends, however it ends.
struct FreshDir(std::path::PathBuf);

impl Drop for FreshDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run(mut options: Options) -> anyhow::Result<()> {
    // On the embedded store, a demo always starts from a fresh directory, so it can be run
    // again and again; on PostgreSQL, only on a database that holds no data yet, since the
    // demo sets its own operator key and seeds parties.
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
            fresh_dir = Some(FreshDir(dir));
            place
        }
        StorageChoice::Postgres { url, .. } => {
            let mut client = farthing_store_postgres::connect(url)
                .await
                .context("connecting to the demo's database")?;
            farthing_store_postgres::migrate(&mut client)
                .await
                .context("bringing the demo database's schema up to date")?;
            if farthing_store_postgres::holds_data(&client).await? {
                bail!(
                    "the database already holds Farthing data; the demo runs only on an empty \
                     database (it sets its own operator key), so create one for it, for example \
                     with `createdb farthing_demo`"
                );
            }
            "data in PostgreSQL".to_string()
        }
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
    let (merchants, payers, earlier, held) = seed(&service).await?;
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
        "# {} refunds {}'s earlier article ({}), in full",
        news.name, earlier.payer, earlier.id
    );
    println!(
        "curl -s -X POST {base}/v1/payments/{}/refunds -H 'Authorization: Bearer {}'",
        earlier.id, news.key
    );
    println!();
    println!(
        "# {} held 2.00 of {}'s wallet for a play session ({}); it captures what was played, \
         and the rest goes back",
        game.name, held.payer, held.id
    );
    println!(
        "curl -s -X POST {base}/v1/payments/{}/capture -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"amount\":\"0.60\"}}'",
        held.id, game.key
    );
    println!();
    println!("# The platform's metrics, for the operator");
    println!(
        "curl -s {base}/metrics -H 'Authorization: Bearer {}'",
        operator_key.expose()
    );
    println!();
    println!("API reference: {base}/docs   OpenAPI document: {base}/openapi.json");
    println!("Press Ctrl-C to stop.");
    let result = server.await;
    drop(service);
    // A fresh directory's data is made for one run only.
    drop(fresh_dir);
    result??;
    Ok(())
}

/// A payment the demo makes while seeding, so that the refund line names a real one.
struct EarlierPayment {
    id: String,
    payer: &'static str,
}

async fn seed(
    service: &Service,
) -> anyhow::Result<(Vec<Seeded>, Vec<Seeded>, EarlierPayment, EarlierPayment)> {
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
    // Ben read an article of The Daily Penny's before the demo began.
    let (ben, news) = (&payers[1], &merchants[0]);
    let command = service.pay_command(
        farthing_payments::PayerId::parse(&ben.id).context("a seeded payer id")?,
        farthing_payments::MerchantId::parse(&news.id).context("a seeded merchant id")?,
        amount("0.25"),
        usd,
        Some("Article: yesterday's news".to_string()),
        None,
    );
    let paid = service
        .submit(farthing_payments::Command::Pay(command), None)
        .await?;
    let Outcome::Paid(payment) = paid.outcome else {
        bail!("could not seed an earlier payment");
    };
    let earlier = EarlierPayment {
        id: payment.id.to_string(),
        payer: ben.name,
    };
    // And Pixel Quest holds 2.00 of Ben's wallet for a play session, to capture what is played.
    let game = &merchants[1];
    let session = service.pay_command(
        farthing_payments::PayerId::parse(&ben.id).context("a seeded payer id")?,
        farthing_payments::MerchantId::parse(&game.id).context("a seeded merchant id")?,
        amount("2"),
        usd,
        Some("Play session".to_string()),
        None,
    );
    let authorize = farthing_payments::HoldCommand::Authorize {
        pay: session,
        expires_at: service
            .now()
            .saturating_add_secs(farthing_payments::HOLD_SECS_DEFAULT),
        settle_id: farthing_ledger::TransferId(service.next_id()),
    };
    let authorized = service.submit(authorize.into(), None).await?;
    let Outcome::Room(farthing_payments::RoomOutcome::Holds(
        farthing_payments::HoldOutcome::Changed(session),
    )) = authorized.outcome
    else {
        bail!("could not seed a held payment");
    };
    let held = EarlierPayment {
        id: session.id.to_string(),
        payer: ben.name,
    };
    Ok((merchants, payers, earlier, held))
}
