//! Prometheus metrics, kept and written in the Prometheus text format (0.0.4) by
//! `prometheus-client`: the HTTP counters and the request-duration histogram are its metrics;
//! the service's and the store's own counts are read at each scrape by a collector.

use std::fmt;
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use farthing_service::Service;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::App;

/// Upper bounds of the request-duration histogram, in seconds.
const BUCKETS_SECS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The classes responses are counted by.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The metrics of one server: its registry, and handles to what each request updates.
pub struct HttpMetrics {
    registry: Registry,
    /// By status class, 1xx … 5xx: handles into one family, made once, so that counting a
    /// response takes no lock.
    responses: [Counter; 5],
    duration: Histogram,
}

impl HttpMetrics {
    pub fn new(service: Service) -> HttpMetrics {
        let mut registry = Registry::default();
        let family = Family::<Vec<(&'static str, &'static str)>, Counter>::default();
        let responses = CLASSES.map(|class| family.get_or_create(&vec![("class", class)]).clone());
        registry.register(
            "farthing_http_responses",
            "HTTP responses by status class",
            family,
        );
        let duration = Histogram::new(BUCKETS_SECS);
        registry.register(
            "farthing_http_request_duration_seconds",
            "Time to answer a request",
            duration.clone(),
        );
        registry.register_collector(Box::new(ServiceCollector(service)));
        HttpMetrics {
            registry,
            responses,
            duration,
        }
    }
}

pub async fn track(State(app): State<App>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &app.metrics;
    let class = (response.status().as_u16() / 100).clamp(1, 5) as usize - 1;
    metrics.responses[class].inc();
    metrics.duration.observe(started.elapsed().as_secs_f64());
    response
}

/// What the service and its store count themselves, read at each scrape.
struct ServiceCollector(Service);

impl fmt::Debug for ServiceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceCollector")
    }
}

impl Collector for ServiceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let service = &self.0;
        let counts = service.metrics();
        let counters = [
            (
                "farthing_journal_commits",
                "Durable commits (one fsync, or one transaction, each).",
                counts.commits.load(Relaxed),
            ),
            (
                "farthing_journal_records",
                "Records made durable.",
                counts.records_committed.load(Relaxed),
            ),
            (
                "farthing_journal_commit_micros",
                "Time spent applying and committing, in microseconds.",
                counts.commit_micros_total.load(Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        // A store's counters, one family per name (they come grouped by name).
        let store = service.store_counters();
        let mut at = 0;
        while at < store.len() {
            let name = store[at].name;
            let end = store[at..]
                .iter()
                .position(|counter| counter.name != name)
                .map_or(store.len(), |n| at + n);
            let family = name.strip_suffix("_total").unwrap_or(name);
            let mut metric = encoder.encode_descriptor(
                family,
                store[at].help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for counter in &store[at..end] {
                let value = ConstCounter::new(counter.value);
                match counter.label {
                    Some(label) => value.encode(metric.encode_family(&vec![label])?)?,
                    None => value.encode(metric.encode_family(&Vec::<(&str, &str)>::new())?)?,
                }
            }
            at = end;
        }
        // Counts of a shared store would cost the database a scan per scrape: PostgreSQL's
        // own statistics serve there.
        if service.is_local() {
            let (merchants, payers, payments, transfers) = service.read_now(|state| {
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
                let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

/// `/metrics` on the API's address: Prometheus text for the operator's key alone, since the
/// counts tell outsiders how much the platform does. `--metrics-listen` serves it without a
/// key on an address of the operator's choosing.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "System",
    summary = "Prometheus metrics",
    description = "Metrics in the Prometheus text exposition format (version 0.0.4, \
        `Content-Type: text/plain; version=0.0.4; charset=utf-8`): \
        `farthing_http_responses_total{class}`, `farthing_http_request_duration_seconds` \
        (histogram), `farthing_journal_commits_total`, `farthing_journal_records_total`, \
        `farthing_journal_commit_micros_total`, and the gauges `farthing_merchants`, \
        `farthing_payers`, `farthing_payments` and `farthing_ledger_transfers`. For the \
        operator's key only: the counts tell how much the platform does. A server started with \
        `--metrics-listen ADDR` also serves `/metrics` there without a key, for a scraper on a \
        private address.",
    responses(
        (
            status = 200,
            description = "The metrics.",
            body = String,
            content_type = "text/plain",
            example = json!(
                "# HELP farthing_payments Payments.\n\
                 # TYPE farthing_payments gauge\n\
                 farthing_payments 42\n"
            ),
        ),
        (status = 401, response = crate::openapi::Unauthorized),
        (status = 404, response = crate::openapi::NotFound),
        (status = 429, response = crate::openapi::RateLimited),
    ),
)]
pub async fn render_for_operator(
    State(app): State<App>,
    caller: crate::Caller,
) -> Result<Response, crate::ApiError> {
    caller.require_operator()?;
    Ok(render(State(app)).await)
}

pub async fn render(State(app): State<App>) -> Response {
    let mut out = String::with_capacity(4096);
    if let Err(error) =
        prometheus_client::encoding::prometheus_text::encode(&mut out, &app.metrics.registry)
    {
        tracing::error!(%error, "the metrics could not be written");
        return crate::ApiError::from_status(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
            .into_response();
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
