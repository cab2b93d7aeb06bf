//! Prometheus metrics, rendered by hand in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use axum::Router;
use axum::routing::get;

use crate::App;

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS_SECS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Default)]
pub struct HttpMetrics {
    /// By status class: 1xx … 5xx.
    responses: [AtomicU64; 5],
    duration_buckets: [AtomicU64; BUCKETS_SECS.len()],
    duration_count: AtomicU64,
    duration_micros_sum: AtomicU64,
}

pub async fn track(State(app): State<App>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &app.metrics;
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    metrics.responses[class].fetch_add(1, Relaxed);
    let elapsed = started.elapsed();
    let secs = elapsed.as_secs_f64();
    for (bucket, bound) in metrics.duration_buckets.iter().zip(BUCKETS_SECS) {
        if secs <= bound {
            bucket.fetch_add(1, Relaxed);
        }
    }
    metrics.duration_count.fetch_add(1, Relaxed);
    metrics
        .duration_micros_sum
        .fetch_add(elapsed.as_micros() as u64, Relaxed);
    response
}

/// `/metrics` on the API's address: Prometheus text for the operator's key alone, since the
/// counts tell outsiders how much the platform does. `--metrics-listen` serves it without a
/// key on an address of the operator's choosing.
pub async fn render_for_operator(
    State(app): State<App>,
    caller: crate::Caller,
) -> Result<Response, crate::ApiError> {
    caller.require_operator()?;
    Ok(render(State(app)).await)
}

pub async fn render(State(app): State<App>) -> Response {
    let mut out = String::with_capacity(4096);
    let metrics = &app.metrics;
    out.push_str("# HELP farthing_http_responses_total HTTP responses by status class.\n");
    out.push_str("# TYPE farthing_http_responses_total counter\n");
    for (index, count) in metrics.responses.iter().enumerate() {
        let _ = writeln!(
            out,
            "farthing_http_responses_total{{class=\"{}xx\"}} {}",
            index + 1,
            count.load(Relaxed)
        );
    }
    out.push_str("# HELP farthing_http_request_duration_seconds Time to answer a request.\n");
    out.push_str("# TYPE farthing_http_request_duration_seconds histogram\n");
    for (bucket, bound) in metrics.duration_buckets.iter().zip(BUCKETS_SECS) {
        let _ = writeln!(
            out,
            "farthing_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            bucket.load(Relaxed)
        );
    }
    let count = metrics.duration_count.load(Relaxed);
    let _ = writeln!(
        out,
        "farthing_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "farthing_http_request_duration_seconds_sum {}",
        metrics.duration_micros_sum.load(Relaxed) as f64 / 1e6
    );
    let _ = writeln!(out, "farthing_http_request_duration_seconds_count {count}");
    let service = app.service.metrics();
    let counters = [
        (
            "farthing_journal_commits_total",
            "Durable journal commits (one fsync each).",
            service.commits.load(Relaxed),
        ),
        (
            "farthing_journal_records_total",
            "Records made durable.",
            service.records_committed.load(Relaxed),
        ),
        (
            "farthing_journal_commit_micros_total",
            "Time spent applying and committing, in microseconds.",
            service.commit_micros_total.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let mut named = None;
    for counter in app.service.store_counters() {
        if named != Some(counter.name) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter",
                name = counter.name,
                help = counter.help
            );
            named = Some(counter.name);
        }
        match counter.label {
            Some((label, value)) => {
                let _ = writeln!(
                    out,
                    "{}{{{label}=\"{value}\"}} {}",
                    counter.name, counter.value
                );
            }
            None => {
                let _ = writeln!(out, "{} {}", counter.name, counter.value);
            }
        }
    }
    // Counts of a shared store would cost the database a scan per scrape: PostgreSQL's own
    // statistics serve there.
    if app.service.is_local() {
        let (merchants, payers, payments, transfers) = app.service.read_now(|state| {
            (
                state.merchant_count(),
                state.payer_count(),
                state.payment_count(),
                state.ledger_transfer_count(),
            )
        });
        let gauges = [
            ("farthing_merchants", "Merchants.", merchants),
            ("farthing_payers", "Payers.", payers),
            ("farthing_payments", "Payments.", payments),
            (
                "farthing_ledger_transfers",
                "Ledger transfers, applied or failed.",
                transfers,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
    }
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `/metrics` alone, without a key, over the API's own counts: for `--metrics-listen`.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .fallback(crate::routes::not_found_route)
        .with_state(app)
        .layer(axum::middleware::map_response(crate::error::problems_only))
}
