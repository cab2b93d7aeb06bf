//! Every failure the API answers with, as `application/problem+json` (RFC 9457).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use farthing_payments::Rejection;
use farthing_service::ServiceError;

/// A problem to report: an HTTP status, a stable snake_case code, and a sentence for people.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub title: &'static str,
    pub detail: String,
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
            ServiceError::OperatorKeyRequired => ApiError::new(
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
        let body = serde_json::json!({
            "type": format!("urn:farthing:problem:{}", self.code),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
