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
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::input::{self, json_body};
use crate::{App, BATCH_BODY_BYTES_MAX, Caller, REQUEST_BODY_BYTES_MAX, render};

type ApiResult = Result<Response, ApiError>;

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

fn json_response(status: StatusCode, value: &Value, replayed: bool) -> Response {
    bytes_response(status, value.to_string(), replayed)
}

fn bytes_response(status: StatusCode, body: String, replayed: bool) -> Response {
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
fn body(
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
fn claim(
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

fn unexpected(outcome: Outcome) -> ApiError {
    tracing::error!(?outcome, "an outcome that does not answer this command");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "Internal error",
        "something went wrong on our side",
    )
}

/// 200 when the server can serve; 503 `storage_unavailable` while its store cannot be reached,
/// so that a load balancer sends requests elsewhere.
pub async fn healthz(State(app): State<App>) -> ApiResult {
    app.service.check_storage().await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "ok"}),
        false,
    ))
}

/// `GET /`: what this server is, and where its API reference is.
pub async fn index() -> Response {
    let mut response = crate::INDEX_HTML.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

pub async fn openapi() -> Response {
    let mut response = crate::OPENAPI_JSON.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

pub async fn not_found_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "Not found",
        "no such route",
    )
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        "this route does not take that method",
    )
}

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
    let description = input::optional_text("description", request.description)?;
    let reference = input::optional_text("reference", request.reference)?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let command =
        app.service
            .pay_command(payer, merchant, amount, currency, description, reference);
    let executed = app.service.submit(Command::Pay(command), claim).await?;
    match executed.outcome {
        Outcome::Paid(payment) => {
            let body = serde_json::to_string(&render::payment_view(&payment))
                .expect("a payment view serializes");
            Ok(bytes_response(StatusCode::CREATED, body, executed.replayed))
        }
        Outcome::Rejected(rejection) => {
            Err(ApiError::from_rejection(rejection).replayed(executed.replayed))
        }
        other => Err(unexpected(other)),
    }
}

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
    let items = page.items.iter().map(render::payment).collect();
    Ok(json_response(
        StatusCode::OK,
        &render::list(items, page.has_more),
        false,
    ))
}

pub async fn create_refund(
    State(app): State<App>,
    caller: Caller,
    PathId(id): PathId,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult {
    let payment = PaymentId::parse(&id).ok_or_else(|| ApiError::not_found("payment"))?;
    if matches!(caller.principal, Principal::Payer(_)) {
        return Err(ApiError::not_found("payment"));
    }
    let raw = body(&headers, raw, REQUEST_BODY_BYTES_MAX)?;
    let request: input::CreateRefund = if raw.iter().all(u8::is_ascii_whitespace) {
        input::CreateRefund::default()
    } else {
        json_body(&raw)?
    };
    let amount = match &request.amount {
        None => None,
        Some(text) => Some(input::amount("amount", text, app.service.config())?),
    };
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let executed = app
        .service
        .refund(caller.principal, payment, amount, claim)
        .await?;
    respond_refund(executed)
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
    let items = page.items.iter().map(render::entry).collect();
    Ok(json_response(
        StatusCode::OK,
        &render::list(items, page.has_more),
        false,
    ))
}

/// Idempotency keys of test clock steps remembered at most; beyond this they start over.
pub const TEST_CLOCK_CLAIMS_MAX: usize = 10_000;

/// `GET /v1/test_clock`: the test clock's time.
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
    // What the jump let expire goes at once, not at the next hourly prune.
    app.service.prune_expired_now().await?;
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
