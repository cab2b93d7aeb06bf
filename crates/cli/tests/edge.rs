//! The edge, probed as an attacker or a careless client would: slow and half-sent requests,
//! wrong keys in a row, bodies that are not JSON objects, re-serialized retries, paths that are
//! not text, bad operator keys, names that hide characters, and the first start of a server.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ADMIN_KEY, Party, Server, TempDir};
use serde_json::json;

async fn funded(api: &common::Api, amount: &str) -> Party {
    let payer = api.create_payer("Payer").await;
    api.topup(&payer, amount).await;
    payer
}

/// Sends `request` as raw bytes and reads the answer until the server closes or `wait` ends.
fn raw_exchange(addr: &str, request: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.write_all(request).expect("send");
    stream.set_read_timeout(Some(wait)).expect("read timeout");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_client_that_sends_half_its_headers_is_cut_off_and_sigterm_does_not_wait_for_it() {
    let mut server =
        Server::start_with(&["--header-timeout-secs", "1", "--drain-timeout-secs", "2"]);
    let mut slow = TcpStream::connect(&server.addr).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("send half the headers");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "the half-sent request held its connection for {waited:?}"
    );

    // A second slow client, then SIGTERM: the server exits within its drain limit.
    let mut stalled = TcpStream::connect(&server.addr).expect("connect");
    stalled
        .write_all(b"POST /v1/payers HTTP/1.1\r\nHost: x\r\n")
        .expect("send part of a request");
    let stopping = Instant::now();
    let status = server.terminate(Duration::from_secs(8));
    assert!(status.success(), "{status:?}");
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    let server = Server::start_with(&["--header-timeout-secs", "1"]);
    let started = Instant::now();
    let answer = raw_exchange(
        &server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(10),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn wrong_keys_in_a_row_lock_the_address_out_whatever_key_it_sends_next() {
    let server = Server::start_with(&["--auth-failures-per-min", "5"]);
    let api = server.api();
    let payer = api.create_payer("Ada").await;
    for attempt in 0..5 {
        let reply = api
            .get("/v1/payments", &format!("fk_op_guess_{attempt:060}"))
            .await;
        reply.expect_problem(401, "unauthorized");
    }
    let reply = api.get("/v1/payments", "fk_op_guess_6").await;
    reply.expect_problem(429, "rate_limited");
    assert!(reply.header("retry-after").is_some());
    // The right key now answers exactly as a wrong one: a 429 says nothing about the key.
    api.get("/v1/payments", ADMIN_KEY)
        .await
        .expect_problem(429, "rate_limited");
    api.get("/v1/payments", &payer.key)
        .await
        .expect_problem(429, "rate_limited");
    // Routes without a key still answer.
    assert_eq!(api.get_anonymous("/healthz").await.status, 200);
}

conformance! {
#[tokio::test]
async fn bodies_must_be_json_objects_declared_as_json() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = funded(&api, "1").await;
    // A JSON array with the fields in order is not a payment.
    let array = format!(r#"["{}","0.01","USD",null,null]"#, merchant.id);
    api.post_raw("/v1/payments", &payer.key, &array)
        .await
        .expect_problem(422, "validation_failed");
    // So is a batch item: a batch holds objects (an object that is not a valid payment fails
    // in place; anything else refuses the batch).
    let batch = format!(
        r#"{{"payments":[["{}","{}","0.01","USD",null,null]]}}"#,
        payer.id, merchant.id
    );
    api.post_raw("/v1/payments/batch", ADMIN_KEY, &batch)
        .await
        .expect_problem(422, "validation_failed");
    let batch = json!({"payments": [{"payer": payer.id, "merchant": merchant.id, "amount": "0.01", "currency": "USD", "reference": "\u{84}"}]});
    let answer = api.post("/v1/payments/batch", ADMIN_KEY, &batch).await.expect(200);
    assert_eq!(answer["results"][0]["status"], "failed");
    assert_eq!(answer["results"][0]["code"], "validation_failed");
    // A body under another media type, or none, is refused.
    let http = reqwest::Client::new();
    let body = json!({"merchant": merchant.id, "amount": "0.01", "currency": "USD"}).to_string();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut request = http
            .post(format!("{}/v1/payments", api.base))
            .header("authorization", format!("Bearer {}", payer.key))
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("send");
        assert_eq!(response.status().as_u16(), 415, "{content_type:?}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: serde_json::Value = response.json().await.expect("a problem");
        assert_eq!(problem["code"], "unsupported_media_type");
    }
    // `application/json; charset=utf-8` is JSON.
    let response = http
        .post(format!("{}/v1/payments", api.base))
        .header("authorization", format!("Bearer {}", payer.key))
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(response.status().as_u16(), 201);
    // Nothing above moved money but the last payment.
    assert_eq!(api.payer_usd(&payer).await, "0.99");
}
}

conformance! {
#[tokio::test]
async fn a_re_serialized_retry_replays_and_a_replayed_decline_says_so() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = funded(&api, "1").await;
    let first = format!(
        r#"{{"merchant":"{}","amount":"0.25","currency":"USD","description":"Article"}}"#,
        merchant.id
    );
    // The same request with other spacing, another member order and an explicit null.
    let again = format!(
        "{{\n  \"currency\": \"USD\",\n  \"description\": \"Article\", \"reference\": null,\n  \"amount\": \"0.25\", \"merchant\": \"{}\"\n}}",
        merchant.id
    );
    let paid = api
        .send(reqwest::Method::POST, "/v1/payments", Some(&payer.key), Some(&first), Some("k-1"))
        .await;
    let paid_body = paid.expect(201);
    let replay = api
        .send(reqwest::Method::POST, "/v1/payments", Some(&payer.key), Some(&again), Some("k-1"))
        .await;
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.expect(201)["id"], paid_body["id"]);
    assert_eq!(api.payer_usd(&payer).await, "0.75");
    // Another request under the same key is still refused.
    let other = format!(r#"{{"merchant":"{}","amount":"0.26","currency":"USD"}}"#, merchant.id);
    api.send(reqwest::Method::POST, "/v1/payments", Some(&payer.key), Some(&other), Some("k-1"))
        .await
        .expect_problem(422, "idempotency_key_reused");

    // A decline under a key, replayed: the same 402, marked as a replay.
    let too_much = json!({"merchant": merchant.id, "amount": "5", "currency": "USD"});
    let declined = api.post_idempotent("/v1/payments", &payer.key, &too_much, "k-2").await;
    declined.expect_problem(402, "insufficient_funds");
    assert_eq!(declined.header("idempotent-replayed"), None);
    let replayed = api.post_idempotent("/v1/payments", &payer.key, &too_much, "k-2").await;
    replayed.expect_problem(402, "insufficient_funds");
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(replayed.body, declined.body);
}
}

conformance! {
#[tokio::test]
async fn every_error_is_a_problem_even_for_a_path_that_is_not_text() {
    let server = Server::start();
    let api = server.api();
    api.get("/v1/payments/%ff", ADMIN_KEY)
        .await
        .expect_problem(404, "not_found");
    api.get("/v1/payers/%ff%fe/balance", ADMIN_KEY)
        .await
        .expect_problem(404, "not_found");
    // A request line hyper cannot parse never reaches a handler; a bad header value is 400.
    let answer = raw_exchange(
        &server.addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // The page at `/` says what this is.
    let index = api.get_anonymous("/").await;
    assert_eq!(index.status, 200);
    assert!(index.content_type().starts_with("text/html"));
    assert!(index.body.contains("/openapi.json"));
}
}

conformance! {
#[tokio::test]
async fn names_that_hide_characters_and_fixed_fees_beyond_the_maximum_are_refused() {
    let server = Server::start();
    let api = server.api();
    for name in ["\u{202e}gnp.exe", "Shop\u{200b}", "Shop\u{2066}x", "A\u{feff}"] {
        api.post("/v1/merchants", ADMIN_KEY, &json!({ "name": name }))
            .await
            .expect_problem(422, "validation_failed");
        api.post("/v1/payers", ADMIN_KEY, &json!({ "name": name }))
            .await
            .expect_problem(422, "validation_failed");
    }
    // Letters of any script, and emoji, are names.
    api.post("/v1/merchants", ADMIN_KEY, &json!({ "name": "Café Ωmega 東京 🎮" }))
        .await
        .expect(201);
    api.post(
        "/v1/merchants",
        ADMIN_KEY,
        &json!({ "name": "Greedy", "fee_fixed": "10000.000001" }),
    )
    .await
    .expect_problem(422, "validation_failed");
    api.post(
        "/v1/merchants",
        ADMIN_KEY,
        &json!({ "name": "Flat", "fee_fixed": "10000" }),
    )
    .await
    .expect(201);
}
}

conformance! {
#[tokio::test]
async fn a_fully_refunded_payment_says_what_was_refunded() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", Some(100), None).await;
    let payer = funded(&api, "1").await;
    let paid = api.pay(&payer, &merchant, "0.5").await.expect(201);
    let id = paid["id"].as_str().expect("an id");
    api.post(&format!("/v1/payments/{id}/refunds"), &merchant.key, &json!({}))
        .await
        .expect(201);
    let payment = api.get(&format!("/v1/payments/{id}"), &payer.key).await.expect(200);
    assert_eq!(payment["amount_refunded"], "0.50");
    assert_eq!(payment["refunded"], true);
}
}

/// Starts `farthing serve` with `admin_key` and returns its exit status and standard error,
/// when it exits within a few seconds (it should: these keys are refused at start).
fn serve_with_admin_key(dir: &std::path::Path, admin_key: &str) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .env("FARTHING_ADMIN_KEY", admin_key)
        .env_remove("FARTHING_DATABASE_URL")
        .env_remove("FARTHING_DATA_DIR")
        .env_remove("FARTHING_LISTEN")
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn operator_keys_with_spaces_or_of_spaces_are_refused_at_start() {
    let dir = TempDir::new();
    for key in [
        format!("{ADMIN_KEY} "),
        " ".repeat(40),
        format!("{}\tkey", "k".repeat(32)),
        "é".repeat(40),
    ] {
        let (ok, stderr) = serve_with_admin_key(dir.path(), &key);
        assert!(!ok);
        assert!(stderr.contains("visible ASCII"), "{stderr}");
    }
}

#[tokio::test]
async fn an_operator_key_that_is_a_merchants_key_is_refused_and_the_old_one_keeps_working() {
    let dir = TempDir::new();
    let merchant_key = {
        let server = Server::start_in(dir.path(), &[]);
        let api = server.api();
        api.create_merchant("Shop", None, None).await.key
    };
    let (ok, stderr) = serve_with_admin_key(dir.path(), &merchant_key);
    assert!(!ok, "a merchant's key was taken as the operator key");
    assert!(stderr.contains("the API key of a merchant"), "{stderr}");
    // Nothing changed: the operator key is still the one it was.
    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    assert_eq!(api.get("/v1/payments", ADMIN_KEY).await.status, 200);
}

#[test]
fn a_first_start_that_cannot_listen_makes_no_key_and_the_next_start_prints_one() {
    let dir = TempDir::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().expect("its address").to_string();
    let run = |listen: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_farthing"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path())
            .env_remove("FARTHING_ADMIN_KEY")
            .env_remove("FARTHING_DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run serve");
        let mut first_lines = String::new();
        let mut stdout = child.stdout.take().expect("stdout");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline && !first_lines.contains("listening on") {
            match stdout.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => first_lines.push_str(&String::from_utf8_lossy(&buffer[..n])),
            }
        }
        let _ = child.kill();
        let output = child.wait_with_output().expect("wait");
        (
            first_lines,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = run(&addr);
    assert!(!stdout.contains("operator key"), "{stdout}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert_eq!(stderr.matches("in use").count(), 1, "said once: {stderr}");
    let (stdout, _) = run("127.0.0.1:0");
    assert!(
        stdout.contains("operator key (shown once"),
        "the first start that serves prints the key: {stdout}"
    );
}

#[tokio::test]
async fn metrics_can_be_served_without_a_key_on_an_address_of_their_own() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        probe.local_addr().expect("its address").port()
    };
    let metrics_addr = format!("127.0.0.1:{port}");
    let server = Server::start_with(&["--metrics-listen", &metrics_addr]);
    let api = server.api();
    api.create_payer("Ada").await;
    let scraper = common::Api::new(format!("http://{metrics_addr}"));
    let metrics = scraper.get_anonymous("/metrics").await;
    assert_eq!(metrics.status, 200);
    // The same counts as the API's own address gives the operator.
    assert!(
        metrics
            .body
            .contains("farthing_http_responses_total{class=\"2xx\"} 1"),
        "{}",
        metrics.body
    );
    // Nothing else is served there.
    scraper
        .get_anonymous("/v1/payments")
        .await
        .expect_problem(404, "not_found");
    // On the API's address, the operator's key is still needed.
    api.get_anonymous("/metrics")
        .await
        .expect_problem(401, "unauthorized");
}

#[tokio::test]
async fn a_flood_of_refusals_adds_nothing_to_the_journal() {
    let dir = TempDir::new();
    let server = Server::start_in(dir.path(), &[]);
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let broke = api.create_payer("Broke").await;
    let poor = funded(&api, "0.01").await;
    // The journal's segments, in bytes, up to the zeros a segment made ahead holds after its
    // records (a spare is not a segment).
    let journal_bytes = || -> usize {
        std::fs::read_dir(dir.path().join("journal"))
            .expect("the journal's segments")
            .map(|entry| entry.expect("an entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "farthing"))
            .map(|path| {
                let bytes = std::fs::read(&path).expect("a segment reads");
                bytes
                    .iter()
                    .rposition(|byte| *byte != 0)
                    .map_or(0, |at| at + 1)
            })
            .sum()
    };
    let before = journal_bytes();
    let unknown_payment = common::unknown_id("pay");
    for round in 0..200 {
        api.pay(&broke, &merchant, "0.01")
            .await
            .expect_problem(402, "insufficient_funds");
        let keyed = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"});
        api.post_idempotent("/v1/payments", &poor.key, &keyed, &format!("flood-{round}"))
            .await
            .expect_problem(402, "insufficient_funds");
        api.post(
            &format!("/v1/payments/{unknown_payment}/refunds"),
            &merchant.key,
            &json!({}),
        )
        .await
        .expect_problem(404, "not_found");
        api.post(
            &format!("/v1/payers/{}/topups", broke.id),
            ADMIN_KEY,
            &json!({"amount": "1", "currency": "USD", "source": "sandbox_decline"}),
        )
        .await
        .expect_problem(402, "funding_declined");
    }
    let after = journal_bytes();
    assert_eq!(after, before, "800 refusals grew the journal");
    // A keyed refusal still replays, marked as a replay; the same key for another request is
    // refused as reused.
    let keyed = json!({"merchant": merchant.id, "amount": "1", "currency": "USD"});
    let replay = api
        .post_idempotent("/v1/payments", &poor.key, &keyed, "flood-7")
        .await;
    replay.expect_problem(402, "insufficient_funds");
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    let other = json!({"merchant": merchant.id, "amount": "0.01", "currency": "USD"});
    api.post_idempotent("/v1/payments", &poor.key, &other, "flood-7")
        .await
        .expect_problem(422, "idempotency_key_reused");
    // What can be paid still is, and is journaled.
    api.pay(&poor, &merchant, "0.01").await.expect(201);
    assert!(journal_bytes() > after);
}

#[test]
fn a_data_directory_that_cannot_be_made_is_said_once() {
    let dir = TempDir::new();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("write a file");
    let output = Command::new(env!("CARGO_BIN_EXE_farthing"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(file.join("data"))
        .env("FARTHING_ADMIN_KEY", ADMIN_KEY)
        .env_remove("FARTHING_DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr.matches("Not a directory").count(),
        1,
        "the cause is said once: {stderr}"
    );
}
