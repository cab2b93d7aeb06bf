//! Limits on what one caller may send: requests per second per key, and body size.

#[macro_use]
mod common;

use common::{ADMIN_KEY, Server};

conformance! {
#[tokio::test]
async fn a_key_over_its_rate_limit_gets_429_rate_limited_while_other_keys_go_on() {
    // 5 requests per second per key, bursts of 10.
    let server = Server::start_with(&["--rate-limit", "5"]);
    let api = server.api();
    let payer = api.create_payer("Busy").await;
    let calm = api.create_payer("Calm").await;
    let path = format!("/v1/payers/{}/balance", payer.id);
    let mut limited = 0;
    let mut allowed = 0;
    let started = std::time::Instant::now();
    for _ in 0..30 {
        let reply = api.get(&path, &payer.key).await;
        if reply.status == 429 {
            let problem = reply.expect_problem(429, "rate_limited");
            assert_eq!(problem["status"], 429);
            assert_eq!(reply.header("retry-after"), Some("1"));
            limited += 1;
        } else {
            reply.expect(200);
            allowed += 1;
        }
    }
    // At most the burst plus what refilled while the requests ran, however slow the machine.
    let refilled = (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        allowed <= 10 + refilled,
        "{allowed} requests went through a burst of 10 and {refilled} refilled"
    );
    assert!(
        limited > 0,
        "30 quick requests against a burst of 10 were never limited"
    );
    // The limit is per key: another payer is unaffected.
    api.get(&format!("/v1/payers/{}/balance", calm.id), &calm.key)
        .await
        .expect(200);
    // And the operator, whose key made two requests, is too.
    api.get(&path, ADMIN_KEY).await.expect(200);
}
}

conformance! {
#[tokio::test]
async fn a_body_over_the_size_limit_is_413_payload_too_large_and_moves_no_money() {
    let server = Server::start();
    let api = server.api();
    let merchant = api.create_merchant("Shop", None, None).await;
    let payer = api.create_payer("Ada").await;
    api.topup(&payer, "10").await;
    let padding = "x".repeat(70 * 1024);
    let body = format!(
        r#"{{"merchant":"{}","amount":"1","currency":"USD","description":"{padding}"}}"#,
        merchant.id
    );
    api.post_raw("/v1/payments", &payer.key, &body)
        .await
        .expect_problem(413, "payload_too_large");
    assert_eq!(api.payer_usd(&payer).await, "10.00");
    // Just under the limit, the same request is judged on its content (a description too long).
    let short = format!(
        r#"{{"merchant":"{}","amount":"1","currency":"USD","description":"{}"}}"#,
        merchant.id,
        "x".repeat(60 * 1024)
    );
    api.post_raw("/v1/payments", &payer.key, &short)
        .await
        .expect_problem(422, "validation_failed");
}
}
