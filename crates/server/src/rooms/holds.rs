//! The holds room's routes: capturing and canceling a held payment. (A hold is placed by
//! `POST /v1/payments` with `"capture_method": "manual"`, which every payment shares, and
//! read as a payment.)

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::routing::post;
use farthing_payments::HoldCommand;
use serde::Deserialize;
use utoipa::{OpenApi, ToSchema};

use crate::error::ApiError;
use crate::openapi::{
    self, HoldConflict, InternalError, NotFound, PayloadTooLarge, RateLimited, Unauthorized,
    UnavailableWrite, UnprocessableRequest, problem, problem_example, problem_with_example,
};
use crate::routes::{
    ApiResult, PathId, amount_in_optional_body, body, claim, payment_settled_by, respond_payment,
};
use crate::{App, Caller, REQUEST_BODY_BYTES_MAX, input, render};

/// The room's routes.
pub fn router() -> Router<App> {
    Router::new()
        .route("/v1/payments/{id}/capture", post(capture_payment))
        .route("/v1/payments/{id}/cancel", post(cancel_payment))
}

/// The room's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(capture_payment, cancel_payment),
    components(schemas(CapturePayment), responses(UnprocessableCapture))
)]
pub struct Api;

/// A capture's body: the amount to capture, all that was authorized by default.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(as = CapturePaymentRequest)]
pub struct CapturePayment {
    #[schema(schema_with = openapi::capture_amount_request)]
    pub amount: Option<String>,
}

impl input::OptionalAmount for CapturePayment {
    fn amount(&self) -> Option<&str> {
        self.amount.as_deref()
    }
}

openapi::problem_response! {
    /// 422 for a capture.
    UnprocessableCapture => problem_with_example(
        problem(
            422,
            "`validation_failed`: the body is not JSON, has unknown fields or wrong types, or \
             `amount` is invalid, or the `Idempotency-Key` is malformed. \
             `idempotency_key_reused`: the `Idempotency-Key` was already used by this API key \
             with a different request. `capture_exceeds_authorization`: the amount to capture is \
             larger than what was authorized.",
            &["validation_failed", "idempotency_key_reused", "capture_exceeds_authorization"],
            &[],
        ),
        problem_example(
            422,
            "capture_exceeds_authorization",
            "Capture exceeds authorization",
            "the amount to capture is larger than the amount authorized",
        ),
    );
}

#[utoipa::path(
    post,
    path = "/v1/payments/{id}/capture",
    operation_id = "capturePayment",
    tag = "Payments",
    summary = "Capture a held payment",
    description = "**Keys:** operator, or the payment's merchant. Payer keys and other \
        merchants' keys are answered 404 `not_found`.\n\n\
        Moves `amount` of a payment made with `\"capture_method\": \"manual\"` (by default, \
        all that was authorized) from the payer's held money to the merchant, less the fee on \
        what is captured; the rest goes back to the wallet at once. The payment becomes \
        `succeeded`, with `amount` what was captured and `amount_authorized` what was held, \
        and takes its line on the payer's statement. A payment that is not held (paid at once, \
        or already captured, canceled or expired) is 409 `payment_not_held`; one whose \
        `capture_before` has passed is 409 `hold_expired`; more than was authorized is 422 \
        `capture_exceeds_authorization`. The body may be empty.",
    params(openapi::PaymentIdInPath, openapi::IdempotencyKey),
    request_body(
        content = CapturePayment,
        description = "Optional: an empty (or all-whitespace) body captures all that was \
            authorized.",
        example = json!({"amount": "0.0010"}),
    ),
    responses(
        (
            status = 200,
            description = "The payment was captured.",
            body = render::PaymentView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = HoldConflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableCapture),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn capture_payment(
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
    let amount = amount_in_optional_body::<CapturePayment>(&raw, app.service.config())?;
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let command = HoldCommand::Capture {
        payment,
        amount,
        caller: caller.principal,
    };
    let executed = app.service.submit(command.into(), claim).await?;
    respond_payment(executed, StatusCode::OK)
}

#[utoipa::path(
    post,
    path = "/v1/payments/{id}/cancel",
    operation_id = "cancelPayment",
    tag = "Payments",
    summary = "Cancel a held payment",
    description = "**Keys:** operator, or the payment's merchant. Payer keys and other \
        merchants' keys are answered 404 `not_found`.\n\n\
        Gives a payment made with `\"capture_method\": \"manual\"` back to the payer: the \
        held amount is available in the wallet again, and the payment becomes `canceled` with \
        `cancellation_reason` `requested`. A payment that is not held (paid at once, or \
        already captured, canceled or expired) is 409 `payment_not_held`. The body must be \
        empty.",
    params(openapi::PaymentIdInPath, openapi::IdempotencyKey),
    responses(
        (
            status = 200,
            description = "The payment was canceled.",
            body = render::PaymentView,
            headers(("Idempotent-Replayed")),
        ),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 409, response = HoldConflict),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = UnprocessableRequest),
        (status = 429, response = RateLimited),
        (status = 500, response = InternalError),
        (status = 503, response = UnavailableWrite),
    ),
)]
pub async fn cancel_payment(
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
    if !raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::validation("canceling a payment takes no body"));
    }
    let claim = claim(&caller, &headers, &method, &uri, &raw)?;
    let command = HoldCommand::Cancel {
        payment,
        caller: caller.principal,
    };
    let executed = app.service.submit(command.into(), claim).await?;
    respond_payment(executed, StatusCode::OK)
}
