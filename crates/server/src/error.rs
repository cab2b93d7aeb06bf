//! Every failure the API answers with, as `application/problem+json` (RFC 9457).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use farthing_payments::{RefusalKind, Rejection};
use farthing_service::ServiceError;
use serde::Serialize;
use utoipa::ToSchema;

/// A problem to report: an HTTP status, a stable snake_case code, and a sentence for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
    /// Whether this is the stored answer of an earlier request with the same idempotency key.
    pub replayed: bool,
    /// Seconds to wait before trying again, for a 429.
    pub retry_after_secs: u64,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            title,
            detail: detail.into(),
            replayed: false,
            retry_after_secs: 1,
        }
    }

    /// Marks a replayed answer, which then carries `Idempotent-Replayed: true`.
    pub fn replayed(mut self, replayed: bool) -> ApiError {
        self.replayed = replayed;
        self
    }

    pub fn unsupported_media_type() -> ApiError {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Unsupported media type",
            "send the body as JSON, with `Content-Type: application/json`",
        )
    }

    /// The problem for a bare status that some layer answered with (a timeout, a malformed
    /// request line): every error the server gives is `application/problem+json`.
    pub fn from_status(status: StatusCode) -> ApiError {
        match status {
            StatusCode::BAD_REQUEST => ApiError::new(
                status,
                "bad_request",
                "Bad request",
                "the request could not be read",
            ),
            StatusCode::NOT_FOUND => ApiError::not_found("route"),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::new(
                status,
                "method_not_allowed",
                "Method not allowed",
                "this route does not take that method",
            ),
            StatusCode::REQUEST_TIMEOUT => ApiError::new(
                status,
                "request_timeout",
                "Request timeout",
                "the request was not sent and answered within the server's limit; retry it with the same Idempotency-Key",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                status,
                "payload_too_large",
                "Payload too large",
                "the request body is larger than the server accepts",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::unsupported_media_type(),
            StatusCode::TOO_MANY_REQUESTS => ApiError::rate_limited(),
            status if status.is_client_error() => ApiError::new(
                status,
                "bad_request",
                "Bad request",
                "the request could not be served",
            ),
            StatusCode::SERVICE_UNAVAILABLE => ApiError::new(
                status,
                "unavailable",
                "Service unavailable",
                "the server cannot answer now; retry later",
            ),
            _ => ApiError::new(
                status,
                "internal_error",
                "Internal error",
                "something went wrong on our side",
            ),
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Unauthorized",
            "send a valid API key as `Authorization: Bearer <key>`",
        )
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            format!("no such {what}"),
        )
    }

    pub fn validation(detail: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            "Validation failed",
            detail,
        )
    }

    pub fn forbidden_role(detail: impl Into<String>) -> ApiError {
        // Another party's route answers as if it did not exist, so that ids cannot be probed.
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "Not found", detail)
    }

    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Payload too large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    pub fn rate_limited() -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many requests",
            "this API key sent more requests than its rate limit allows; retry shortly",
        )
    }

    /// The answer to an address that failed to authenticate too often: refused for `left`,
    /// whatever key it sends.
    pub fn rate_limited_for(left: std::time::Duration) -> ApiError {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "Too many requests",
            "too many requests with a missing or wrong API key came from this address; retry later",
        );
        error.retry_after_secs = left.as_secs().max(1);
        error
    }

    pub fn from_rejection(rejection: Rejection) -> ApiError {
        use Rejection::*;
        match rejection {
            PayerNotFound => ApiError::not_found("payer"),
            MerchantNotFound => ApiError::not_found("merchant"),
            PaymentNotFound => ApiError::not_found("payment"),
            InsufficientFunds => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_funds",
                "Insufficient funds",
                "the wallet's available balance does not cover this payment",
            ),
            FundingDeclined => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "funding_declined",
                "Funding declined",
                "the funding provider declined this top-up",
            ),
            RefundExceedsPayment => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refund_exceeds_payment",
                "Refund exceeds payment",
                "the refund is larger than what is left of the payment",
            ),
            MerchantBalanceInsufficient => ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient_funds",
                "Insufficient funds",
                "the merchant's available balance does not cover this refund",
            ),
            AmountNotPositive => ApiError::validation("the amount must be greater than zero"),
            AmountTooLarge => ApiError::validation(
                "the amount would take a balance beyond the largest the ledger keeps",
            ),
            IdempotencyKeyReused => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency key reused",
                "this Idempotency-Key was used with a different request",
            ),
            IdCollision => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "retry",
                "Retry",
                "a generated id was already taken; retry the request",
            ),
            Room(rejection) => {
                let explained = rejection.explain();
                let status = match explained.kind {
                    RefusalKind::NotFound => StatusCode::NOT_FOUND,
                    RefusalKind::Conflict => StatusCode::CONFLICT,
                    RefusalKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
                    RefusalKind::PaymentRequired => StatusCode::PAYMENT_REQUIRED,
                };
                ApiError::new(status, explained.code, explained.title, explained.detail)
            }
            // Only `farthing copy` imports; no request asks for one.
            ImportDoesNotFit => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
                "something went wrong on our side",
            ),
        }
    }

    /// The stable code of a rejection, for batch results.
    pub fn code_of(rejection: Rejection) -> &'static str {
        ApiError::from_rejection(rejection).code
    }
}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> ApiError {
        match error {
            ServiceError::ShuttingDown => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "Shutting down",
                "the server is shutting down; retry against another instance or later",
            ),
            ServiceError::StorageUnavailable => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                "Storage unavailable",
                "storage refused the write or cannot be reached, and nothing was acknowledged; retry later with the same Idempotency-Key",
            ),
            // Only ever returned at start, before any request is served.
            ServiceError::OperatorKeyRequired | ServiceError::OperatorKeyTaken(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
                "the server has no operator key",
            ),
            ServiceError::Store(store) => {
                tracing::error!(error = %store, "storage failure");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    "Storage unavailable",
                    "storage is unavailable; retry later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem::new(self.status.as_u16(), self.code, self.title, &self.detail);
        // Through a `Value`, which writes its members sorted by name, as problems always were.
        let body = serde_json::to_value(problem).expect("a problem serializes");
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(self.retry_after_secs),
            );
        }
        if self.replayed {
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

/// The body of every error answer.
#[derive(Serialize, ToSchema)]
#[schema(
    description = "An error, as `application/problem+json` (RFC 9457). `code` is stable; `title` \
        and `detail` are for people. The codes: `bad_request` (400: a request that could not be \
        read), `unauthorized` (401), `not_found` (404), `method_not_allowed` (405), \
        `request_timeout` (408: the request was not sent and answered within the server's \
        limit), `unsupported_media_type` (415: a body not declared as `application/json`), \
        `validation_failed` (422), `idempotency_key_reused` (422), `refund_exceeds_payment` \
        (422), `insufficient_funds` (402), `funding_declined` (402), `payload_too_large` (413), \
        `rate_limited` (429), `internal_error` (500), `shutting_down` (503), \
        `storage_unavailable` (503), `retry` (503), `unavailable` (503: the server cannot \
        answer now)."
)]
pub struct Problem<'a> {
    /// `urn:farthing:problem:` followed by `code`.
    #[serde(rename = "type")]
    #[schema(
        format = "uri",
        pattern = "^urn:farthing:problem:[a-z][a-z0-9_]*$",
        examples("urn:farthing:problem:not_found")
    )]
    kind: String,
    /// A short summary of the kind of problem; the same for every problem with this `code`.
    #[schema(examples("Not found"))]
    title: &'a str,
    #[schema(schema_with = crate::openapi::problem_status)]
    status: u16,
    /// What went wrong with this request, for people.
    #[schema(examples("no such payment"))]
    detail: &'a str,
    /// A stable snake_case code to act on.
    #[schema(
        pattern = "^[a-z][a-z0-9_]*$",
        examples(
            "unauthorized",
            "not_found",
            "method_not_allowed",
            "validation_failed",
            "idempotency_key_reused",
            "refund_exceeds_payment",
            "insufficient_funds",
            "funding_declined",
            "payload_too_large",
            "rate_limited",
            "internal_error",
            "shutting_down",
            "storage_unavailable",
            "retry",
            "bad_request",
            "request_timeout",
            "unsupported_media_type",
            "unavailable"
        )
    )]
    code: &'a str,
}

impl<'a> Problem<'a> {
    pub fn new(status: u16, code: &'a str, title: &'a str, detail: &'a str) -> Problem<'a> {
        Problem {
            kind: format!("urn:farthing:problem:{code}"),
            title,
            status,
            detail,
            code,
        }
    }
}

/// Turns any error answer that is not yet a problem (one made by a layer or an extractor
/// outside Farthing's handlers) into `application/problem+json`, keeping its status and
/// headers such as `Allow` and `Retry-After`.
pub async fn problems_only(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
    if is_problem {
        return response;
    }
    let (parts, _) = response.into_parts();
    let mut problem = ApiError::from_status(status).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}
