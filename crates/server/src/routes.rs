//! Route handlers: parse, authorize, call the service, render.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use farthing_payments::*;
use farthing_service::{Executed, fingerprint};
use farthing_store::StatementPage;
use serde_json::Value;

use crate::error::ApiError;
use crate::input::{self, json_body};
use crate::openapi::{
    self, BatchResults, FundingDeclined, InsufficientFunds, InternalError, NotFound,
    PayloadTooLarge, RateLimited, Unauthorized, Unavailable, UnavailableWrite, UnprocessableRefund,
    UnprocessableRequest, ValidationFailed,
};
use crate::{App, BATCH_BODY_BYTES_MAX, Caller, REQUEST_BODY_BYTES_MAX, render};

pub(crate) type ApiResult = Result<Response, ApiError>;

/// The id in a route's path. One that is not even text (`/v1/payments/%ff`) names nothing:
/// 404, as any id that is not found.
pub struct PathId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<PathId, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(id)| PathId(id))
            .map_err(|_| ApiError::not_found("object at this path"))
    }
}

pub(crate) fn json_response(status: StatusCode, value: &Value, replayed: bool) -> Response {
    bytes_response(status, value.to_string(), replayed)
}

pub(crate) fn bytes_response(status: StatusCode, body: String, replayed: bool) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// The body of a POST, within `limit` bytes and declared as JSON when it is not empty.
pub(crate) fn body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    match body {
        Ok(bytes) if bytes.len() <= limit => {
            input::require_json_type(headers, &bytes)?;
            Ok(bytes)
        }
        Ok(_) => Err(ApiError::payload_too_large(limit)),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(rejection) => Err(ApiError::validation(format!(
            "could not read the body: {rejection}"
        ))),
    }
}

/// The idempotency claim of a POST, if it carries an `Idempotency-Key`. Two requests are the
/// same when their method, path and parsed bodies are: the body's canonical form is compared,
/// not its bytes, so a client that re-serializes a request replays it.
pub(crate) fn claim(
    caller: &Caller,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    body: &[u8],
) -> Result<Option<IdempotencyClaim>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_BYTES_MAX)
        .ok_or_else(|| {
            ApiError::validation(format!(
                "`Idempotency-Key` must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
            ))
        })?;
    Ok(Some(IdempotencyClaim {
        key: IdempotencyKey {
            principal: caller.principal,
            key: key.to_string(),
        },
        fingerprint: fingerprint(&[
            method.as_str().as_bytes(),
            uri.path().as_bytes(),
            &input::canonical_json(body)
                .ok_or_else(|| ApiError::validation("the request body is not valid JSON"))?,
        ]),
    }))
}

pub(crate) fn unexpected(outcome: Outcome) -> ApiError {
    tracing::error!(?outcome, "an outcome that does not answer this command");
    ApiError::from_status(StatusCode::INTERNAL_SERVER_ERROR)
}

/// 200 when the server can serve; 503 `storage_unavailable` while its store cannot be reached,
/// so that a load balancer sends requests elsewhere.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "System",
    summary = "Health check",
    description = "Answers 200 once the server accepts requests, and 503 `storage_unavailable` \
        while its store cannot be reached (a PostgreSQL database that is down), so that a load \
        balancer can send requests elsewhere. Needs no key.",
    security(),
    responses(
        (
            status = 200,
            description = "The server is up.",
            body = render::Health,
            example = json!({"status": "ok"}),
        ),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn healthz(State(app): State<App>) -> ApiResult {
    app.service.check_storage().await?;
    Ok(json_response(StatusCode::OK, &render::health(), false))
}

/// `GET /`: what this server is, and where its API reference is.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "index",
    tag = "System",
    summary = "What this server is",
    description = "A small HTML page that says what this server is and links the OpenAPI \
        document and the health check. Needs no key.",
    security(),
    responses((status = 200, description = "The page.", body = String, content_type = "text/html")),
)]
pub async fn index() -> Response {
    let mut response = crate::INDEX_HTML.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "System",
    summary = "This OpenAPI document",
    description = "The OpenAPI 3.1 document describing this API. Needs no key.",
    security(),
    responses((status = 200, description = "This document.", body = Object)),
)]
pub async fn openapi() -> Response {
    let mut response = crate::openapi::openapi_json().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub async fn not_found_route() -> ApiError {
    ApiError::from_status(StatusCode::NOT_FOUND)
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::from_status(StatusCode::METHOD_NOT_ALLOWED)
}

#[utoipa::path(
    post,
    path = "/v1/merchants",
    operation_id = "createMerchant",
    tag = "Merchants",
    summary = "Create a merchant",
    description = "**Keys:** operator. Merchant and payer keys are answered 404 `not_found`.\n\n\
        Creates a merchant and its API key, which is in the answer and shown only this once. \
        Without `fee_bps` and `fee_fixed` the merchant pays the server's default fee (zero \
        unless the operator sets `FARTHING_DEFAULT_FEE_BPS` / `FARTHING_DEFAULT_FEE_FIXED`); if \
        only one of the two is given, the other is taken from the default.",
    params(openapi::IdempotencyKey),
    request_body(
        content = input::CreateMerchant,
        example = json!({"name": "Acme News", "fee_bps": 250, "fee_fixed": "0.0001"}),
    ),
    responses(
        (
            status = 201,
            description = "The merchant was created. `api_key` is present on creation; on an \
                idempotent replay it is present only while the same server process that created \
                the merchant is running.",
            body = render::MerchantView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_merchant(
    State(app): State<App>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.require_operator()?;
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::CreateMerchant = json_body(&raw)?;
    let name = input::name("name", &request.name)?;
    let fee = request.fee(app.service.config())?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let executed = app.service.create_merchant(name, fee, claim).await?;
    match executed.outcome {
        Outcome::MerchantCreated(merchant) => Ok(json_response(
            StatusCode::CREATED,
            &render::merchant(&merchant, executed.api_key.as_ref().map(|k| k.expose())),
            executed.replayed,
        )),
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(
    post,
    path = "/v1/payers",
    operation_id = "createPayer",
    tag = "Payers",
    summary = "Create a payer",
    description = "**Keys:** operator. Merchant and payer keys are answered 404 `not_found`.\n\n\
        Creates a payer, with empty wallets, and its API key, which is in the answer and shown \
        only this once.",
    params(openapi::IdempotencyKey),
    request_body(content = input::CreatePayer, example = json!({"name": "Ada"})),
    responses(
        (
            status = 201,
            description = "The payer was created. `api_key` is present on creation; on an \
                idempotent replay it is present only while the same server process that created \
                the payer is running.",
            body = render::PayerView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_payer(
    State(app): State<App>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.require_operator()?;
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::CreatePayer = json_body(&raw)?;
    let name = input::name("name", &request.name)?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let executed = app.service.create_payer(name, claim).await?;
    match executed.outcome {
        Outcome::PayerCreated(payer) => Ok(json_response(
            StatusCode::CREATED,
            &render::payer(&payer, executed.api_key.as_ref().map(|k| k.expose())),
            executed.replayed,
        )),
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

/// The payer a path names, if the caller may act for it.
fn payer_in_path(caller: &Caller, id: &str) -> Result<PayerId, ApiError> {
    let payer = PayerId::parse(id).ok_or_else(|| ApiError::not_found("payer"))?;
    match caller.principal {
        Principal::Operator => Ok(payer),
        Principal::Payer(own) if own == payer => Ok(payer),
        _ => Err(ApiError::not_found("payer")),
    }
}

fn merchant_in_path(caller: &Caller, id: &str) -> Result<MerchantId, ApiError> {
    let merchant = MerchantId::parse(id).ok_or_else(|| ApiError::not_found("merchant"))?;
    match caller.principal {
        Principal::Operator => Ok(merchant),
        Principal::Merchant(own) if own == merchant => Ok(merchant),
        _ => Err(ApiError::not_found("merchant")),
    }
}

#[allow(clippy::too_many_arguments)]
#[utoipa::path(
    post,
    path = "/v1/payers/{id}/topups",
    operation_id = "createTopup",
    tag = "Payers",
    summary = "Top up a payer's wallet",
    description = "**Keys:** operator, or the payer named in the path. Merchant keys and other \
        payers' keys are answered 404 `not_found`.\n\n\
        Adds money to the payer's wallet in `currency`, from a funding `source`: `\"sandbox\"` \
        always succeeds, `\"sandbox_decline\"` is always declined with 402 `funding_declined`. \
        A decline is kept for the `Idempotency-Key` and replayed on retry.",
    params(openapi::PayerIdInPath, openapi::IdempotencyKey),
    request_body(
        content = input::CreateTopup,
        example = json!({"amount": "5.00", "currency": "USD", "source": "sandbox"}),
    ),
    responses(
        (
            status = 201,
            description = "The top-up succeeded and the wallet was credited.",
            body = render::TopupView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 402, response = FundingDeclined),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_topup(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let payer = payer_in_path(&caller, &id)?;
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::CreateTopup = json_body(&raw)?;
    let config = app.service.config();
    let amount = input::amount("amount", &request.amount, config)?;
    let currency = input::currency(&request.currency, config)?;
    let source = match request.source.as_str() {
        "sandbox" => FundingSource::Sandbox,
        "sandbox_decline" => FundingSource::SandboxDecline,
        other => {
            return Err(ApiError::validation(format!(
                "`source` {other:?} is not a funding source (\"sandbox\" or \"sandbox_decline\")"
            )));
        }
    };
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let executed = app
        .service
        .topup(payer, amount, currency, source, claim)
        .await?;
    match executed.outcome {
        Outcome::ToppedUp(topup) => Ok(json_response(
            StatusCode::CREATED,
            &render::topup(&topup),
            executed.replayed,
        )),
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(
    get,
    path = "/v1/payers/{id}/balance",
    operation_id = "getPayerBalance",
    tag = "Payers",
    summary = "A payer's balances",
    description = "**Keys:** operator, or the payer named in the path. Merchant keys and other \
        payers' keys are answered 404 `not_found`.\n\n\
        The available balance of each of the payer's wallets, one per currency it has used, in \
        alphabetical order of currency. A payer that never topped up has none.",
    params(openapi::PayerIdInPath),
    responses(
        (
            status = 200,
            description = "The payer's balances.",
            body = render::BalancesView,
            example = json!({"balances": [{"currency": "USD", "available": "4.9975"}]}),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 429, response = RateLimited),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn payer_balance(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult {
    let payer = payer_in_path(&caller, &id)?;
    let balances = app
        .service
        .payer_balances(payer)
        .await?
        .ok_or_else(|| ApiError::not_found("payer"))?;
    Ok(json_response(
        StatusCode::OK,
        &render::balances(&balances),
        false,
    ))
}

#[utoipa::path(
    get,
    path = "/v1/merchants/{id}/balance",
    operation_id = "getMerchantBalance",
    tag = "Merchants",
    summary = "A merchant's balances",
    description = "**Keys:** operator, or the merchant named in the path. Payer keys and other \
        merchants' keys are answered 404 `not_found`.\n\n\
        The available balance of each of the merchant's accounts, one per currency it has been \
        paid in, in alphabetical order of currency: payments' net amounts, less what refunds \
        took back.",
    params(openapi::MerchantIdInPath),
    responses(
        (
            status = 200,
            description = "The merchant's balances.",
            body = render::BalancesView,
            example = json!({"balances": [{"currency": "USD", "available": "0.0024"}]}),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 429, response = RateLimited),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn merchant_balance(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
) -> ApiResult {
    let merchant = merchant_in_path(&caller, &id)?;
    let balances = app
        .service
        .merchant_balances(merchant)
        .await?
        .ok_or_else(|| ApiError::not_found("merchant"))?;
    Ok(json_response(
        StatusCode::OK,
        &render::balances(&balances),
        false,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/payments",
    operation_id = "createPayment",
    tag = "Payments",
    summary = "Pay a merchant",
    description = "**Keys:** payer. The payer whose key is used pays. Operator and merchant keys \
        are answered 404 `not_found` (operators pay on payers' behalf with \
        `POST /v1/payments/batch`).\n\n\
        Moves `amount` from the payer's wallet in `currency` to the merchant, less the \
        merchant's fee: `fee = floor(amount × fee_bps / 10000) + fee_fixed`, never more than \
        the amount, and `net = amount − fee`. A wallet that does not cover the amount is 402 \
        `insufficient_funds`; that decline is kept for the `Idempotency-Key` and replayed on \
        retry. A well-formed `merchant` id that names no merchant is 404 `not_found`; a \
        malformed one is 422 `validation_failed`.\n\n\
        With `\"capture_method\": \"manual\"` the payment is only authorized: the amount is \
        held in the wallet (no longer available, not yet moved) and the answer's `status` is \
        `requires_capture`. The merchant or the operator then captures it (all of it or less, \
        `POST /v1/payments/{id}/capture`; the fee is taken on what is captured and the rest \
        goes back to the wallet) or cancels it (`POST /v1/payments/{id}/cancel`). A hold not \
        captured within `hold_seconds` (default 604,800: 7 days; at most 2,592,000: 30 days) \
        expires: the payment becomes `canceled` with `cancellation_reason` `expired`, and the \
        money goes back to the wallet. A held payment shows on the payer's statement once \
        captured.",
    params(openapi::IdempotencyKey),
    request_body(
        content = input::CreatePayment,
        example = json!({
            "merchant": "mer_01j9z3k8q2x7v5m4n6p8r0t2w4",
            "amount": "0.0025",
            "currency": "USD",
            "description": "One article",
            "reference": "article-1234"
        }),
    ),
    responses(
        (
            status = 201,
            description = "The payment succeeded, or (with `capture_method` `manual`) its \
                amount is held for capture.",
            body = render::PaymentView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 402, response = InsufficientFunds),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_payment(
    State(app): State<App>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let Principal::Payer(payer) = caller.principal else {
        return Err(ApiError::forbidden_role(
            "payments are made with a payer's key; operators use /v1/payments/batch",
        ));
    };
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::CreatePayment = json_body(&raw)?;
    let config = app.service.config();
    let merchant = input::merchant_id("merchant", &request.merchant)?;
    let amount = input::amount("amount", &request.amount, config)?;
    let currency = input::currency(&request.currency, config)?;
    let hold_seconds = request.hold_seconds()?;
    let description = input::optional_text("description", request.description)?;
    let reference = input::optional_text("reference", request.reference)?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let command =
        app.service
            .pay_command(payer, merchant, amount, currency, description, reference);
    let command = match hold_seconds {
        None => Command::Pay(command),
        Some(secs) => Command::from(HoldCommand::Authorize {
            pay: command,
            expires_at: app.service.now().saturating_add_secs(secs),
            settle_id: farthing_ledger::TransferId(app.service.next_id()),
        }),
    };
    let executed = app.service.submit(command, claim).await?;
    respond_payment(executed, StatusCode::CREATED)
}

#[utoipa::path(
    post,
    path = "/v1/payments/batch",
    operation_id = "createPaymentBatch",
    tag = "Payments",
    summary = "Make many payments at once",
    description = "**Keys:** operator. Merchant and payer keys are answered 404 `not_found`.\n\n\
        Makes up to 8,190 payments, each from the `payer` it names, in one durable commit. The \
        body may be up to 8 MiB (other routes: 64 KiB). Each item succeeds or fails on its own, \
        and `results` answers them in the order they were sent. An item that is not a valid \
        payment (unknown fields, a malformed id, an invalid amount or currency, text too long) \
        fails in place with `validation_failed` rather than failing the request; an item whose \
        payer or merchant does not exist fails with `not_found`, one whose wallet does not cover \
        it with `insufficient_funds`. The request as a whole is 422 `validation_failed` only \
        when the body is not `{\"payments\": [...]}` with 1 to 8,190 items, or the \
        `Idempotency-Key` is malformed.",
    params(openapi::IdempotencyKey),
    request_body(
        content = input::BatchPayments,
        example = json!({"payments": [{
            "payer": "pyr_01j9z3k8q2x7v5m4n6p8r0t2w4",
            "merchant": "mer_01j9z3k8q2x7v5m4n6p8r0t2w4",
            "amount": "0.0025",
            "currency": "USD",
            "reference": "article-1234"
        }]}),
    ),
    responses(
        (
            status = 200,
            description = "The batch was processed; see each result's `status`.",
            body = BatchResults,
            headers(("Idempotent-Replayed")),
            example = json!({"results": [
                {"id": "pay_01j9z3k8q2x7v5m4n6p8r0t2w4", "status": "succeeded"},
                {"status": "failed", "code": "insufficient_funds"}
            ]}),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_payment_batch(
    State(app): State<App>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.require_operator()?;
    let raw = body(&headers, raw, BATCH_BODY_BYTES_MAX)?;
    let items: Vec<Result<input::BatchItem, ApiError>> =
        match serde_json::from_slice::<input::BatchPaymentsTyped>(&raw) {
            Ok(typed) => typed.payments.into_iter().map(|item| Ok(item.0)).collect(),
            Err(_) => json_body::<input::BatchPayments>(&raw)?
                .objects()?
                .into_iter()
                .map(|item| {
                    serde_json::from_value::<input::Object<input::BatchItem>>(item)
                        .map(|item| item.0)
                        .map_err(|error| ApiError::validation(format!("invalid payment: {error}")))
                })
                .collect(),
        };
    let max = farthing_service::PAYMENTS_PER_BATCH_MAX;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::validation(format!(
            "`payments` must hold 1 to {max} payments"
        )));
    }
    let config = app.service.config();
    // Items that fail validation are answered in place; the rest go to the ledger together.
    let mut slots: Vec<Result<usize, &'static str>> = Vec::with_capacity(items.len());
    let mut commands = Vec::with_capacity(items.len());
    for item in items {
        let parsed = item.and_then(|item| {
            Ok(app.service.pay_command(
                input::payer_id("payer", &item.payer)?,
                input::merchant_id("merchant", &item.merchant)?,
                input::amount("amount", &item.amount, config)?,
                input::currency(&item.currency, config)?,
                input::optional_text("description", item.description)?,
                input::optional_text("reference", item.reference)?,
            ))
        });
        match parsed {
            Ok(command) => {
                slots.push(Ok(commands.len()));
                commands.push(command);
            }
            Err(error) => slots.push(Err(error.code)),
        }
    }
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let (outcomes, replayed) = if commands.is_empty() {
        (Vec::new(), false)
    } else {
        let executed = app
            .service
            .submit(Command::PayBatch(commands), claim)
            .await?;
        match executed.outcome {
            Outcome::PaidBatch(outcomes) => (outcomes, executed.replayed),
            Outcome::Rejected(rejection) => {
                return Err(ApiError::from_rejection(rejection).replayed(executed.replayed));
            }
            other => return Err(unexpected(other)),
        }
    };
    let mut out = String::with_capacity(16 + slots.len() * 64);
    out.push_str("{\"results\":[");
    for (index, slot) in slots.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        match slot {
            Ok(position) => match outcomes[*position] {
                BatchItemOutcome::Succeeded(id) => {
                    out.push_str("{\"id\":\"");
                    let _ = write!(out, "{id}");
                    out.push_str("\",\"status\":\"succeeded\"}");
                }
                BatchItemOutcome::Failed(rejection) => {
                    out.push_str("{\"status\":\"failed\",\"code\":\"");
                    out.push_str(ApiError::code_of(rejection));
                    out.push_str("\"}");
                }
            },
            Err(code) => {
                out.push_str("{\"status\":\"failed\",\"code\":\"");
                out.push_str(code);
                out.push_str("\"}");
            }
        }
    }
    out.push_str("]}");
    let mut response = (StatusCode::OK, out).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[utoipa::path(
    get,
    path = "/v1/payments/{id}",
    operation_id = "getPayment",
    tag = "Payments",
    summary = "Retrieve a payment",
    description = "**Keys:** operator, the payment's payer, or the payment's merchant. Any other \
        key is answered 404 `not_found`, as for a payment that does not exist.",
    params(openapi::PaymentIdInPath),
    responses(
        (status = 200, description = "The payment.", body = render::PaymentView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 429, response = RateLimited),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn get_payment(State(app): State<App>, caller: Caller, PathId(id): PathId) -> ApiResult {
    let id = PaymentId::parse(&id).ok_or_else(|| ApiError::not_found("payment"))?;
    let payment = app
        .service
        .payment(caller.principal, id)
        .await?
        .map(|payment| render::payment(&payment))
        .ok_or_else(|| ApiError::not_found("payment"))?;
    Ok(json_response(StatusCode::OK, &payment, false))
}

#[utoipa::path(
    get,
    path = "/v1/payments",
    operation_id = "listPayments",
    tag = "Payments",
    summary = "List payments",
    description = "**Keys:** operator (every payment), merchant (payments to it), payer \
        (payments it made).\n\n\
        Payments the caller may see, newest first. A `starting_after` that is not a payment id \
        is 422 `validation_failed`; one the caller may not see, or that does not exist, is 404 \
        `not_found`.",
    params(openapi::Limit, openapi::StartingAfterPayment),
    responses(
        (status = 200, description = "A page of payments.", body = render::PaymentList),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn list_payments(
    State(app): State<App>,
    caller: Caller,
    query: Result<Query<input::ListQuery>, QueryRejection>,
) -> ApiResult {
    let Query(query) =
        query.map_err(|error| ApiError::validation(format!("invalid query string: {error}")))?;
    let limit = query.limit()?;
    let cursor =
        match &query.starting_after {
            None => None,
            Some(text) => Some(PaymentId::parse(text).ok_or_else(|| {
                ApiError::validation("`starting_after` is not a payment id (pay_…)")
            })?),
        };
    let page = app
        .service
        .list_payments(caller.principal, limit, cursor)
        .await?
        .ok_or_else(|| ApiError::not_found("payment"))?;
    Ok(json_response(
        StatusCode::OK,
        &render::payment_list(&page.items, page.has_more),
        false,
    ))
}

#[utoipa::path(
    post,
    path = "/v1/payments/{id}/refunds",
    operation_id = "createRefund",
    tag = "Refunds",
    summary = "Refund a payment",
    description = "**Keys:** operator, or the payment's merchant. Payer keys and other \
        merchants' keys are answered 404 `not_found`.\n\n\
        Returns `amount` (by default, all that is left of the payment) to the payer's wallet, \
        taking back from the merchant its net and the fee in proportion. A payment may be \
        refunded in several parts. More than is left, or a refund of a fully refunded payment, \
        is 422 `refund_exceeds_payment`; a merchant whose available balance does not cover the \
        refund is 402 `insufficient_funds`, a decline that is kept for the `Idempotency-Key` and \
        replayed on retry. The body may be empty.",
    params(openapi::PaymentIdInPath, openapi::IdempotencyKey),
    request_body(
        content = input::CreateRefund,
        description = "Optional: an empty (or all-whitespace) body refunds everything that is \
            left.",
        example = json!({"amount": "0.0010"}),
    ),
    responses(
        (
            status = 201,
            description = "The refund succeeded.",
            body = render::RefundView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 402, response = InsufficientFunds),
        (status = 404, response = NotFound),
        (status = 409, response = openapi::HoldConflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRefund),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn create_refund(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let payment = payment_settled_by(&caller, &id)?;
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let amount = amount_in_optional_body::<input::CreateRefund>(&raw, app.service.config())?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let executed = app
        .service
        .refund(caller.principal, payment, amount, claim)
        .await?;
    respond_refund(executed)
}

/// The payment a refund, capture or cancel names: only its merchant and the operator settle
/// a payment, and a payer is answered as if there were none.
pub(crate) fn payment_settled_by(caller: &Caller, id: &str) -> Result<PaymentId, ApiError> {
    let payment = PaymentId::parse(id).ok_or_else(|| ApiError::not_found("payment"))?;
    if matches!(caller.principal, Principal::Payer(_)) {
        return Err(ApiError::not_found("payment"));
    }
    Ok(payment)
}

/// The `amount` of a body that may be empty (all of what is left, then).
pub(crate) fn amount_in_optional_body<
    T: serde::de::DeserializeOwned + Default + input::OptionalAmount,
>(
    raw: &Bytes,
    config: &farthing_service::Config,
) -> Result<Option<farthing_ledger::Amount>, ApiError> {
    let request: T = if raw.iter().all(u8::is_ascii_whitespace) {
        T::default()
    } else {
        json_body(raw)?
    };
    request
        .amount()
        .map(|text| input::amount("amount", text, config))
        .transpose()
}

/// A payment made, held, captured or canceled, answered with `status`.
pub(crate) fn respond_payment(executed: Executed, status: StatusCode) -> ApiResult {
    match executed.outcome {
        Outcome::Paid(payment)
        | Outcome::Room(RoomOutcome::Holds(HoldOutcome::Changed(payment))) => {
            let body = serde_json::to_string(&render::payment_view(&payment))
                .expect("a payment view serializes");
            Ok(bytes_response(status, body, executed.replayed))
        }
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

fn respond_refund(executed: Executed) -> ApiResult {
    match executed.outcome {
        Outcome::Refunded(refund) => Ok(json_response(
            StatusCode::CREATED,
            &render::refund(&refund),
            executed.replayed,
        )),
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

#[utoipa::path(
    get,
    path = "/v1/payers/{id}/transactions",
    operation_id = "listPayerTransactions",
    tag = "Payers",
    summary = "A payer's statement",
    description = "**Keys:** operator, or the payer named in the path. Merchant keys and other \
        payers' keys are answered 404 `not_found`.\n\n\
        The ledger entries of the payer's wallets, newest first: a credit for each top-up and \
        refund, a debit for each payment, each with the wallet's balance after it. A \
        `starting_after` that is not a top-up, payment or refund id is 422 \
        `validation_failed`; one that is not in this payer's statement is 404 `not_found`.",
    params(openapi::PayerIdInPath, openapi::Limit, openapi::StartingAfterEntry),
    responses(
        (
            status = 200,
            description = "A page of the payer's ledger entries.",
            body = render::LedgerEntryList,
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 503, response = Unavailable),
    ),
)]
pub async fn payer_transactions(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
    query: Result<Query<input::ListQuery>, QueryRejection>,
) -> ApiResult {
    let payer = payer_in_path(&caller, &id)?;
    let Query(query) =
        query.map_err(|error| ApiError::validation(format!("invalid query string: {error}")))?;
    let limit = query.limit()?;
    let cursor = match &query.starting_after {
        None => None,
        Some(text) => Some(
            PaymentId::parse(text)
                .map(EntryObject::Payment)
                .or_else(|| TopupId::parse(text).map(EntryObject::Topup))
                .or_else(|| RefundId::parse(text).map(EntryObject::Refund))
                .ok_or_else(|| {
                    ApiError::validation("`starting_after` is not a payment, top-up or refund id")
                })?,
        ),
    };
    let page = match app.service.payer_entries(payer, limit, cursor).await? {
        StatementPage::Page(page) => page,
        StatementPage::UnknownPayer => return Err(ApiError::not_found("payer")),
        StatementPage::UnknownCursor => {
            return Err(ApiError::not_found("transaction for `starting_after`"));
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &render::entry_list(&page.items, page.has_more),
        false,
    ))
}

/// Idempotency keys of test clock steps remembered at most; beyond this they start over.
pub const TEST_CLOCK_CLAIMS_MAX: usize = 10_000;

/// `GET /v1/test_clock`: the test clock's time.
#[utoipa::path(
    get,
    path = "/v1/test_clock",
    operation_id = "getTestClock",
    tag = "Test clock",
    summary = "Read the test clock",
    description = "**Keys:** operator. Merchant and payer keys are answered 404 `not_found`. \
        Only on a server started with `--test-clock` (or `FARTHING_TEST_CLOCK=1`); elsewhere the \
        route answers 404 `not_found`.\n\n\
        The time every rule of the server follows now.",
    responses(
        (status = 200, description = "The time now.", body = render::TestClockView),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
    ),
)]
pub async fn test_clock(State(app): State<App>, caller: Caller) -> ApiResult {
    caller.require_operator()?;
    let now = app.service.now();
    Ok(json_response(
        StatusCode::OK,
        &render::test_clock(now),
        false,
    ))
}

/// `POST /v1/test_clock`: moves the test clock forward by `advance_seconds`, for every rule that
/// follows time (periods, windows, expiries, the age of idempotency keys), durably.
///
/// Under an `Idempotency-Key` a retry replays the first answer and moves nothing; such keys
/// are remembered in this process only (at most [`TEST_CLOCK_CLAIMS_MAX`]).
#[utoipa::path(
    post,
    path = "/v1/test_clock",
    operation_id = "advanceTestClock",
    tag = "Test clock",
    summary = "Move the test clock forward",
    description = "**Keys:** operator. Merchant and payer keys are answered 404 `not_found`. \
        Only on a server started with `--test-clock` (or `FARTHING_TEST_CLOCK=1`); elsewhere the \
        route answers 404 `not_found`.\n\n\
        Moves the server's time forward by `advance_seconds`, as Stripe's test \
        clocks do: every time-based rule follows it (idempotency keys older than 24 hours expire \
        at once; periods, windows and expiries follow). The step is kept durably (in the data \
        directory, or in the database for every server on it), so time never goes back, across \
        restarts too. Under an `Idempotency-Key` a retry replays the first answer and moves \
        nothing; the keys of test clock steps are remembered by the server process that took \
        them (not across a restart).",
    params(openapi::IdempotencyKey),
    request_body(content = input::AdvanceTestClock, example = json!({"advance_seconds": 86400})),
    responses(
        (
            status = 200,
            description = "The clock moved; the time now.",
            body = render::TestClockView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn advance_test_clock(
    State(app): State<App>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    caller.require_operator()?;
    let clock = app
        .test_clock
        .clone()
        .ok_or_else(|| ApiError::not_found("route"))?;
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::AdvanceTestClock = json_body(&raw)?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    if let Some(claim) = &claim {
        let claims = app
            .test_clock_claims
            .lock()
            .expect("test clock claims lock");
        if let Some((fingerprint, answer)) = claims.get(&claim.key.key) {
            if *fingerprint != claim.fingerprint {
                return Err(ApiError::from_rejection(Rejection::IdempotencyKeyReused));
            }
            return Ok(json_response(StatusCode::OK, answer, true));
        }
    }
    let max = farthing_service::TEST_CLOCK_ADVANCE_SECS_MAX;
    if request.advance_seconds > max {
        return Err(ApiError::validation(format!(
            "`advance_seconds` must be from 0 to {max}: time only moves forward"
        )));
    }
    if !clock.may_advance(request.advance_seconds) {
        return Err(ApiError::validation(format!(
            "the test clock runs at most {} seconds ahead of the wall clock",
            farthing_service::TEST_CLOCK_LEAD_SECS_MAX
        )));
    }
    let now = clock
        .advance(request.advance_seconds)
        .await
        .map_err(farthing_service::ServiceError::from)?;
    // What the jump let expire goes at once, not at the next hourly prune or expiry tick.
    app.service.prune_expired_now().await?;
    app.service.expire_holds_now().await?;
    let answer = render::test_clock(now);
    if let Some(claim) = claim {
        let mut claims = app
            .test_clock_claims
            .lock()
            .expect("test clock claims lock");
        if claims.len() >= TEST_CLOCK_CLAIMS_MAX {
            claims.clear();
        }
        claims.insert(claim.key.key, (claim.fingerprint, answer.clone()));
    }
    Ok(json_response(StatusCode::OK, &answer, false))
}
