//! Farthing's HTTP API, and the composition root: the one crate that picks a storage backend
//! and knows JSON.
//!
//! [`run`] opens the embedded store in the data directory, replays it, binds the listener and
//! serves until the shutdown future completes; in-flight requests then drain and the writer
//! commits what it holds.
#![forbid(unsafe_code)]

mod error;
mod input;
mod metrics;
mod ratelimit;
mod render;
mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::routing::{get, post};
use farthing_payments::Principal;
use farthing_service::{Config, RandomIds, Secret, Service, SystemClock};
use farthing_store_embedded::FileJournal;
use farthing_store_postgres::{PgOptions, PgStore};

pub use error::ApiError;
pub use farthing_service::Config as ServiceConfig;

/// The largest body of an ordinary request.
pub const REQUEST_BODY_BYTES_MAX: usize = 64 * 1024;
/// The largest body of a batch request: 8,190 payments of a few hundred bytes each.
pub const BATCH_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

/// The OpenAPI 3.1 document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Shared by every handler.
#[derive(Clone)]
pub struct App {
    pub service: Service,
    limiter: Arc<ratelimit::RateLimiter>,
    metrics: Arc<metrics::HttpMetrics>,
}

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
        let key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(|key| Secret::new(key.trim().to_string()))
            .ok_or_else(ApiError::unauthorized)?;
        let principal = app
            .service
            .authenticate(&key)
            .await?
            .ok_or_else(ApiError::unauthorized)?;
        if !app.limiter.allow(principal) {
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
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Service(#[from] farthing_service::ServiceError),
    #[error(transparent)]
    Store(#[from] farthing_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
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
    pub generated_admin_key: Option<Secret>,
    pub records_replayed: u64,
    pub service: Service,
}

/// The router over a running service.
pub fn router(service: Service, rate_limit_per_sec: u32) -> Router {
    let app = App {
        service,
        limiter: Arc::new(ratelimit::RateLimiter::new(rate_limit_per_sec)),
        metrics: Arc::new(metrics::HttpMetrics::default()),
    };
    Router::new()
        .route("/healthz", get(routes::healthz))
        .route("/metrics", get(metrics::render))
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
/// completes. Returns once in-flight requests have drained and the journal is closed.
pub async fn run(
    options: Options,
    on_start: impl FnOnce(&Started),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let admin_key = options.admin_key.map(Secret::new);
    let opened = match &options.storage {
        StorageChoice::Embedded(data_dir) => {
            let journal = FileJournal::open(data_dir)?;
            Service::open(
                Box::new(journal),
                options.config,
                Arc::new(SystemClock),
                Arc::new(RandomIds),
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
            Service::open_shared(
                Arc::new(store),
                options.config,
                Arc::new(SystemClock),
                Arc::new(RandomIds),
                admin_key,
                *writers,
            )
            .await?
        }
    };
    let listener = tokio::net::TcpListener::bind(&options.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: options.listen.clone(),
            source,
        })?;
    let started = Started {
        addr: listener.local_addr()?,
        generated_admin_key: opened.generated_operator_key,
        records_replayed: opened.records_replayed,
        service: opened.service.clone(),
    };
    on_start(&started);
    drop(started);
    let service = opened.service;
    let app = router(service.clone(), options.rate_limit_per_sec);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tokio::task::spawn_blocking(move || service.shutdown())
        .await
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    Ok(())
}
