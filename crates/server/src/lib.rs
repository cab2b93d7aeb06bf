//! Farthing's HTTP API, and the composition root: the one crate that picks a storage backend
//! and knows JSON.
//!
//! [`run`] opens the embedded store in the data directory, replays it, binds the listener and
//! serves until the shutdown future completes; in-flight requests then drain and the writer
//! commits what it holds.
#![forbid(unsafe_code)]

mod control;
mod docs;
mod error;
mod input;
mod metrics;
mod openapi;
mod ratelimit;
mod render;
mod rooms;
mod routes;
mod serve;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use farthing_payments::Principal;
use farthing_service::{
    CacheOptions, Clock, Config, Secret, Service, SystemClock, TestClock, TimeOrderedIds,
};
use farthing_store_embedded::FileTestClock;
use farthing_store_postgres::{PgOptions, PgStore};

pub use error::ApiError;
pub use farthing_service::Config as ServiceConfig;

/// The largest body of an ordinary request.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// The largest body of a batch request: 8,190 payments of a few hundred bytes each.
pub const BATCH_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

pub use openapi::openapi_json;

/// The page at `/`: what this server is, with links to the API reference and the document.
pub const INDEX_HTML: &str = include_str!("index.html");

/// Shared by every handler.
#[derive(Clone)]
pub struct App {
    pub service: Service,
    /// The test clock, when the server was started with one: only then is `/v1/test_clock`
    /// served.
    pub test_clock: Option<Arc<TestClock>>,
    /// Answers of test clock steps by idempotency key, in this process.
    test_clock_claims: Arc<std::sync::Mutex<std::collections::HashMap<String, TestClockClaim>>>,
    limits: Arc<ratelimit::Limits>,
    metrics: Arc<metrics::HttpMetrics>,
}

/// A test clock step's request fingerprint and answer.
type TestClockClaim = ([u8; 32], serde_json::Value);

/// The authenticated caller of a request.
pub struct Caller {
    pub principal: Principal,
}

impl Caller {
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self.principal {
            Principal::Operator => Ok(()),
            _ => Err(ApiError::forbidden_role("this route is for the operator")),
        }
    }
}

impl FromRequestParts<App> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Caller, ApiError> {
        let address = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
        // An address that failed too often is refused before its key is looked at, so that
        // the answer says nothing about the key.
        if let ratelimit::Admission::Blocked(left) = app.limits.admit(address) {
            return Err(ApiError::rate_limited_for(left));
        }
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|key| Secret::new(key.trim().to_string()));
        let principal = match key {
            Some(key) => app.service.authenticate(&key).await?,
            None => None,
        };
        let Some(principal) = principal else {
            return Err(match app.limits.fail(address) {
                ratelimit::Admission::Open => ApiError::unauthorized(),
                ratelimit::Admission::Blocked(left) => ApiError::rate_limited_for(left),
            });
        };
        if !app.limits.allow_key(principal) {
            return Err(ApiError::rate_limited());
        }
        Ok(Caller { principal })
    }
}

/// Which store holds the state.
#[derive(Clone, Debug)]
pub enum StorageChoice {
    /// The embedded store in this directory, owned by this process alone.
    Embedded(PathBuf),
    /// A PostgreSQL database, which several processes may share. The schema is brought up to
    /// date at start.
    Postgres {
        url: String,
        /// Writer tasks in this process.
        writers: usize,
        /// Connections this process opens at most.
        connections_max: usize,
    },
}

/// How to run the server.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: String,
    /// Where the state is kept.
    pub storage: StorageChoice,
    /// The operator key to use; when `None` and the data has none, one is made and printed.
    pub admin_key: Option<String>,
    pub config: Config,
    /// Requests per second per API key; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Failed authentications per minute per client address before the address is refused.
    pub auth_failures_per_min: u32,
    /// Where `/metrics` is also served without a key (for a scraper on a private address);
    /// on the API's own address it is for the operator only.
    pub metrics_listen: Option<String>,
    /// The edge's limits.
    pub edge: EdgeLimits,
    /// Run on a test clock that the operator moves forward (`POST /v1/test_clock`).
    pub test_clock: bool,
    /// The embedded store's memory.
    pub memory: Memory,
}

/// How much memory the embedded store uses: bounded whatever its history (ADR 0004).
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// About how many bytes of rows are kept in memory beyond what changed since the last
    /// checkpoint.
    pub cache_bytes: usize,
    /// History rows made between checkpoints (a payment makes one); what changed since the
    /// last checkpoint stays in memory.
    pub checkpoint_rows: usize,
    /// The engine's own block cache, in bytes.
    pub engine_cache_bytes: u64,
    /// The size at which the journal starts a new segment; segments a checkpoint holds are
    /// removed whole.
    pub journal_segment_bytes: u64,
    /// Asks the process's allocator to give free memory back to the operating system, called
    /// after the cache lets rows go (see [`farthing_service::CacheOptions::give_back`]).
    pub give_back: Option<fn()>,
}

/// The engine's block cache by default.
pub const ENGINE_CACHE_BYTES_DEFAULT: u64 = 64 << 20;

impl Default for Memory {
    fn default() -> Memory {
        Memory {
            cache_bytes: farthing_service::CACHE_BYTES_DEFAULT,
            checkpoint_rows: farthing_service::CHECKPOINT_ROWS_DEFAULT,
            engine_cache_bytes: ENGINE_CACHE_BYTES_DEFAULT,
            journal_segment_bytes: farthing_store_embedded::SEGMENT_BYTES_MAX,
            give_back: None,
        }
    }
}

/// Limits at the edge, for every connection and request.
#[derive(Clone, Copy, Debug)]
pub struct EdgeLimits {
    /// Connections served at once; more wait to be accepted.
    pub connections_max: usize,
    /// A request's head (or the next request's, on an idle kept-alive connection) must
    /// arrive within this, else the connection is closed.
    pub header_timeout: Duration,
    /// A whole request, body included, must be answered within this, else 408.
    pub request_timeout: Duration,
    /// On shutdown, in-flight requests get this long to finish; connections still open then
    /// are closed.
    pub drain_timeout: Duration,
}

impl Default for EdgeLimits {
    fn default() -> EdgeLimits {
        EdgeLimits {
            connections_max: CONNECTIONS_MAX_DEFAULT,
            header_timeout: HEADER_TIMEOUT_DEFAULT,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            drain_timeout: DRAIN_TIMEOUT_DEFAULT,
        }
    }
}

pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
pub const HEADER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
pub const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub const AUTH_FAILURES_PER_MIN_DEFAULT: u32 = 60;
/// How often a server on a shared database reads the test clock that other servers may move.
pub const TEST_CLOCK_REFRESH: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Service(#[from] farthing_service::ServiceError),
    #[error(transparent)]
    Store(#[from] farthing_store::StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("cannot open the PostgreSQL store")]
    Postgres(#[from] farthing_store_postgres::PgError),
}

/// What a started server tells its caller.
pub struct Started {
    pub addr: SocketAddr,
    /// Where `/metrics` is served without a key, when asked for.
    pub metrics_addr: Option<SocketAddr>,
    pub generated_admin_key: Option<Secret>,
    pub records_replayed: u64,
    pub service: Service,
}

impl App {
    pub fn new(service: Service, rate_limit_per_sec: u32, auth_failures_per_min: u32) -> App {
        App {
            metrics: Arc::new(metrics::HttpMetrics::new(service.clone())),
            service,
            test_clock: None,
            test_clock_claims: Arc::default(),
            limits: Arc::new(ratelimit::Limits::new(
                rate_limit_per_sec,
                auth_failures_per_min,
            )),
        }
    }
}

/// The router over a running service.
pub fn router(service: Service, rate_limit_per_sec: u32, auth_failures_per_min: u32) -> Router {
    routes_of(App::new(service, rate_limit_per_sec, auth_failures_per_min))
}

fn routes_of(app: App) -> Router {
    let limits = Arc::downgrade(&app.limits);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ratelimit::LIMITER_SWEEP_INTERVAL);
        tick.tick().await;
        loop {
            tick.tick().await;
            match limits.upgrade() {
                Some(limits) => limits.sweep(),
                None => return,
            }
        }
    });
    let test_clock = app.test_clock.is_some();
    let router = Router::new()
        .route("/", get(routes::index))
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(metrics::render_for_operator))
        .route("/openapi.json", get(routes::openapi))
        .route("/v1/merchants", post(routes::create_merchant))
        .route("/v1/payers", post(routes::create_payer))
        .route("/v1/payers/{id}/topups", post(routes::create_topup))
        .route("/v1/payers/{id}/balance", get(routes::payer_balance))
        .route(
            "/v1/payers/{id}/transactions",
            get(routes::payer_transactions),
        )
        .route("/v1/merchants/{id}/balance", get(routes::merchant_balance))
        .route(
            "/v1/payments",
            post(routes::create_payment).get(routes::list_payments),
        )
        .route(
            "/v1/payments/batch",
            post(routes::create_payment_batch).layer(DefaultBodyLimit::max(BATCH_BODY_BYTES_MAX)),
        )
        .route("/v1/payments/{id}", get(routes::get_payment))
        .route("/v1/payments/{id}/refunds", post(routes::create_refund))
        .merge(rooms::router());
    // Without a test clock the route does not exist: time is the wall clock's.
    let router = if test_clock {
        router.route(
            "/v1/test_clock",
            post(routes::advance_test_clock).get(routes::test_clock),
        )
    } else {
        router
    };
    router
        .merge(docs::router())
        .fallback(routes::not_found_route)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(REQUEST_BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            metrics::track,
        ))
        .with_state(app)
}

/// Opens storage, binds `options.listen`, calls `on_start`, and serves until `shutdown`
/// completes. Returns once in-flight requests have drained (or the drain limit has passed)
/// and the journal is closed.
///
/// The listeners are bound before the store is opened: a server that cannot listen stops
/// before it makes (and would fail to print) an operator key.
pub async fn run(
    options: Options,
    on_start: impl FnOnce(&Started),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listener = bind(&options.listen).await?;
    let metrics_listener = match &options.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let admin_key = options.admin_key.map(Secret::new);
    let mut test_clock = None;
    let mut control = None;
    let opened = match &options.storage {
        StorageChoice::Embedded(data_dir) => {
            let (journal, checkpoints) = farthing_store_embedded::cached::open_serving(
                data_dir,
                options.memory.engine_cache_bytes,
                options.memory.journal_segment_bytes,
            )?;
            control = Some(control::listen(data_dir, checkpoints.engine().clone())?);
            if options.test_clock {
                let store = Arc::new(FileTestClock::open(data_dir)?);
                test_clock = Some(Arc::new(TestClock::open(store).await?));
            }
            let clock: Arc<dyn Clock> = match &test_clock {
                Some(test_clock) => test_clock.clone(),
                None => Arc::new(SystemClock),
            };
            Service::open_cached(
                Box::new(journal),
                CacheOptions {
                    checkpoints: Arc::new(checkpoints),
                    cache_bytes: options.memory.cache_bytes,
                    checkpoint_rows: options.memory.checkpoint_rows,
                    give_back: options.memory.give_back,
                },
                options.config,
                clock,
                Arc::new(TimeOrderedIds),
                admin_key,
            )
            .await?
        }
        StorageChoice::Postgres {
            url,
            writers,
            connections_max,
        } => {
            let store = PgStore::open(
                url,
                PgOptions {
                    connections_max: *connections_max,
                    writer_connections: *writers,
                    ..PgOptions::default()
                },
            )
            .await?;
            let store = Arc::new(store);
            if options.test_clock {
                let clock = Arc::new(TestClock::open(store.clone()).await?);
                // Other servers on the database move it too: take up their steps.
                let refreshed = Arc::downgrade(&clock);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(TEST_CLOCK_REFRESH);
                    loop {
                        tick.tick().await;
                        let Some(clock) = refreshed.upgrade() else {
                            return;
                        };
                        if let Err(error) = clock.refresh().await {
                            tracing::warn!(%error, "could not read the test clock");
                        }
                    }
                });
                test_clock = Some(clock);
            }
            let clock: Arc<dyn Clock> = match &test_clock {
                Some(test_clock) => test_clock.clone(),
                None => Arc::new(SystemClock),
            };
            Service::open_shared(
                store,
                options.config,
                clock,
                Arc::new(TimeOrderedIds),
                admin_key,
                *writers,
            )
            .await?
        }
    };
    let started = Started {
        addr: listener.local_addr()?,
        metrics_addr: match &metrics_listener {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        },
        generated_admin_key: opened.generated_operator_key,
        records_replayed: opened.records_replayed,
        service: opened.service.clone(),
    };
    on_start(&started);
    drop(started);
    let service = opened.service;
    let mut app = App::new(
        service.clone(),
        options.rate_limit_per_sec,
        options.auth_failures_per_min,
    );
    app.test_clock = test_clock;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let metrics_server = metrics_listener.map(|listener| {
        tokio::spawn(serve::serve(
            listener,
            metrics::router(app.clone()),
            options.edge,
            stopped.clone(),
        ))
    });
    let api = tokio::spawn(serve::serve(
        listener,
        routes_of(app),
        options.edge,
        stopped,
    ));
    shutdown.await;
    let _ = stop.send(true);
    api.await
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    if let Some(metrics_server) = metrics_server {
        let _ = metrics_server.await;
    }
    tokio::task::spawn_blocking(move || service.shutdown())
        .await
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    drop(control);
    Ok(())
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        })
}
