//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the code: each operation
//! from the `#[utoipa::path]` attribute on its handler, each body schema from the type that
//! parses or renders it. What utoipa's derive cannot say (shared parameters and headers, the
//! overview, the bearer scheme) is added by [`Shared`].

use std::sync::LazyLock;

use serde_json::{Value, json};
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::path::{Operation, Parameter, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{
    AllOfBuilder, AnyOfBuilder, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Ref, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Components, ContentBuilder, OpenApi as Document, RefOr, Required};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

use crate::{error, input, metrics, render, routes};

/// The document, written once, on first use.
static OPENAPI_JSON: LazyLock<String> = LazyLock::new(|| {
    document()
        .to_pretty_json()
        .expect("the OpenAPI document serializes")
});

/// The whole document: the core's operations and every room's, then what they share.
pub fn document() -> Document {
    let mut document = ApiDoc::openapi();
    document.merge(crate::rooms::openapi());
    Shared.modify(&mut document);
    document
}

/// The OpenAPI document served at `/openapi.json`, as JSON text.
pub fn openapi_json() -> &'static str {
    &OPENAPI_JSON
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Farthing",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    servers((
        url = "http://127.0.0.1:7402",
        description = "The default listen address of `farthing serve`."
    )),
    security(("bearerAuth" = [])),
    tags(
        (name = "System", description = "Health, metrics and this document. No key needed."),
        (name = "Merchants", description = "Merchants receive payments, less a fee."),
        (
            name = "Payers",
            description = "Payers hold prepaid wallets, one per currency, funded by top-ups."
        ),
        (name = "Payments", description = "Money moved from a payer's wallet to a merchant."),
        (
            name = "Refunds",
            description = "Money returned from a merchant to the payer of a payment."
        ),
        (
            name = "Test clock",
            description = "Moving time forward on a server started with `--test-clock`."
        ),
    ),
    paths(
        routes::index,
        routes::healthz,
        metrics::render_for_operator,
        routes::openapi,
        routes::create_merchant,
        routes::create_payer,
        routes::create_topup,
        routes::payer_balance,
        routes::payer_transactions,
        routes::merchant_balance,
        routes::create_payment,
        routes::list_payments,
        routes::create_payment_batch,
        routes::get_payment,
        routes::create_refund,
        routes::test_clock,
        routes::advance_test_clock,
    ),
    components(
        schemas(
            error::Problem,
            render::Health,
            Amount,
            FeeAmount,
            AmountOut,
            SignedAmountOut,
            Currency,
            Timestamp,
            Text,
            Name,
            MerchantId,
            PayerId,
            PaymentId,
            TopupId,
            RefundId,
            input::CreateMerchant,
            input::CreatePayer,
            input::CreateTopup,
            input::CreatePayment,
            input::BatchPayments,
            input::BatchItem,
            input::CreateRefund,
            render::MerchantView,
            render::PayerView,
            render::TopupView,
            render::PaymentView,
            render::RefundView,
            render::BalancesView,
            render::BalanceView,
            render::LedgerEntryView,
            render::PaymentList,
            render::LedgerEntryList,
            BatchResults,
            BatchResult,
            render::TestClockView,
            input::AdvanceTestClock,
        ),
        responses(
            Unauthorized,
            NotFound,
            ValidationFailed,
            UnprocessableRequest,
            UnprocessableRefund,
            HoldConflict,
            InsufficientFunds,
            FundingDeclined,
            PayloadTooLarge,
            RateLimited,
            InternalError,
            Unavailable,
            UnavailableWrite,
        ),
    ),

)]
pub struct ApiDoc;

/// What the derive cannot express: the overview, the bearer scheme, and the parameters and
/// headers that operations share by reference.
pub struct Shared;

impl Modify for Shared {
    fn modify(&self, openapi: &mut Document) {
        let info = &mut openapi.info;
        info.description = Some(include_str!("openapi/overview.md").trim_end().to_string());
        // utoipa's `Info` has no `summary` (new in OpenAPI 3.1): it is written through the
        // extensions map, whose keys are serialized as they are.
        info.extensions
            .get_or_insert_with(Extensions::default)
            .insert(
                "summary".to_string(),
                json!(
                    "A micropayments server: prepaid payer wallets, merchants, payments, refunds."
                ),
            );

        let components = openapi.components.get_or_insert_with(Components::default);
        components.security_schemes.insert(
            "bearerAuth".to_string(),
            RefOr::T(SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(BEARER_DESCRIPTION))
                    .build(),
            )),
        );
        let parameters = shared_parameters();
        for (name, parameter) in &parameters {
            components
                .parameters
                .insert(name.to_string(), RefOr::T(parameter.clone()));
        }
        components.headers.insert(
            IDEMPOTENT_REPLAYED.to_string(),
            RefOr::T(idempotent_replayed()),
        );
        components
            .headers
            .insert("RetryAfter".to_string(), RefOr::T(retry_after()));

        for item in openapi.paths.paths.values_mut() {
            for operation in operations_mut(item) {
                // Handlers name their parameters with the same types as the shared ones: each
                // becomes a reference to its shared definition.
                for parameter in operation.parameters.iter_mut().flatten() {
                    let shared = match parameter {
                        RefOr::T(own) => parameters.iter().find(|(_, shared)| shared == own),
                        RefOr::Ref(_) => None,
                    };
                    if let Some((name, _)) = shared {
                        *parameter =
                            RefOr::Ref(Ref::new(format!("#/components/parameters/{name}")));
                    }
                }
                for response in operation.responses.responses.values_mut() {
                    if let RefOr::T(response) = response
                        && let Some(header) = response.headers.get_mut("Idempotent-Replayed")
                    {
                        *header = RefOr::Ref(Ref::new(format!(
                            "#/components/headers/{IDEMPOTENT_REPLAYED}"
                        )));
                    }
                }
                // A refund's body may be empty, which the derive cannot say of a body whose
                // schema is not nullable.
                if operation.operation_id.as_deref() == Some("createRefund")
                    && let Some(RefOr::T(RequestBody { required, .. })) =
                        &mut operation.request_body
                {
                    *required = Some(Required::False);
                }
            }
        }
    }
}

fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

const BEARER_DESCRIPTION: &str = "`Authorization: Bearer <key>` with one of three kinds of key: \
    the operator key (`FARTHING_ADMIN_KEY`, at least 32 characters), a merchant key (`fk_mer_` \
    and 64 hex digits) or a payer key (`fk_pyr_` and 64 hex digits). Keys are shown once, when \
    created, and stored hashed. A missing or unknown key is 401 `unauthorized`; which kinds of \
    key an operation accepts is in its description.";

const IDEMPOTENT_REPLAYED: &str = "IdempotentReplayed";

fn idempotent_replayed() -> Header {
    HeaderBuilder::new()
        .description(Some(
            "`true` when this answer is a replay of an earlier request with the same \
             `Idempotency-Key`; absent otherwise.",
        ))
        .schema(Some(constant(Type::String, json!("true"))))
        .build()
}

fn retry_after() -> Header {
    HeaderBuilder::new()
        .description(Some("Seconds to wait before retrying."))
        .schema(Some(constant(Type::Integer, json!(1))))
        .build()
}

// Parameters. Each is a type that handlers list in `params(...)`; the document defines it once
// in `components.parameters` and refers to it from every operation.

macro_rules! shared_parameter {
    ($($(#[$doc:meta])* $name:ident => $build:expr;)*) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl IntoParams for $name {
                fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
                    vec![$build]
                }
            }
        )*

        /// Every shared parameter, by its name in `components.parameters`.
        fn shared_parameters() -> Vec<(&'static str, Parameter)> {
            vec![$((stringify!($name), $build)),*]
        }
    };
}

shared_parameter! {
    /// `Idempotency-Key`, on every POST.
    IdempotencyKey => parameter(
        "Idempotency-Key",
        ParameterIn::Header,
        "Makes a POST safe to retry. 1 to 255 visible ASCII characters; anything else is 422 \
         `validation_failed`.\n\n\
         - The same key with the same request (method, path and parsed body: spacing, member \
         order and `null` members do not matter) replays the first answer: the same status and \
         the same body, with the header `Idempotent-Replayed: true`.\n\
         - The same key with a different body (or on another route) is 422 \
         `idempotency_key_reused`.\n\
         - Keys are scoped to the calling API key: callers with different keys never collide.\n\
         - Keys are kept at least 24 hours.\n\
         - What is kept: successes, and declines (402 `insufficient_funds`, 402 \
         `funding_declined`), which are replayed as they were (on the embedded store a decline \
         known before anything is recorded is kept in memory, so after a restart its retry runs \
         again: it can succeed, never pay twice). Other errors (401, 404, 413, 422, 429, 5xx) \
         are not kept, so a corrected retry with the same key goes through.\n\
         - A request that arrives while the first with the same key is still being carried out \
         gets the first's answer.",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(farthing_payments::IDEMPOTENCY_KEY_BYTES_MAX))
            .into(),
    );
    /// `?limit=`, on lists.
    Limit => parameter(
        "limit",
        ParameterIn::Query,
        "How many items to answer at most: a whole number from 1 to 100. Anything else is 422 \
         `validation_failed`.",
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(input::PAGE_ITEMS_MAX as u64))
            .default(Some(json!(input::PAGE_ITEMS_DEFAULT)))
            .into(),
    );
    /// `?starting_after=`, on the list of payments.
    StartingAfterPayment => parameter(
        "starting_after",
        ParameterIn::Query,
        "A cursor: the `id` of the last payment of the previous page. The page holds the \
         payments older than it.",
        reference::<PaymentId>(),
    );
    /// `?starting_after=`, on a payer's statement.
    StartingAfterEntry => parameter(
        "starting_after",
        ParameterIn::Query,
        "A cursor: the `id` of the last entry of the previous page (a top-up, payment or refund \
         id). The page holds the entries older than it.",
        entry_id(None).into(),
    );
    /// The payer in `/v1/payers/{id}/…`.
    PayerIdInPath => parameter(
        "id",
        ParameterIn::Path,
        "The payer's id. A malformed or unknown id is 404 `not_found`.",
        reference::<PayerId>(),
    );
    /// The merchant in `/v1/merchants/{id}/…`.
    MerchantIdInPath => parameter(
        "id",
        ParameterIn::Path,
        "The merchant's id. A malformed or unknown id is 404 `not_found`.",
        reference::<MerchantId>(),
    );
    /// The payment in `/v1/payments/{id}…`.
    PaymentIdInPath => parameter(
        "id",
        ParameterIn::Path,
        "The payment's id. A malformed or unknown id is 404 `not_found`.",
        reference::<PaymentId>(),
    );
}

fn parameter(
    name: &str,
    location: ParameterIn,
    description: &str,
    schema: RefOr<Schema>,
) -> Parameter {
    let required = if location == ParameterIn::Path {
        Required::True
    } else {
        Required::False
    };
    ParameterBuilder::new()
        .name(name)
        .parameter_in(location)
        .required(required)
        .description(Some(description))
        .schema(Some(schema))
        .build()
}

// Responses shared by operations: every error is a `Problem`, pinned to its status and codes.

macro_rules! problem_response {
    ($($(#[$doc:meta])* $name:ident => $build:expr;)*) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl<'r> utoipa::ToResponse<'r> for $name {
                fn response() -> (
                    &'r str,
                    utoipa::openapi::RefOr<utoipa::openapi::response::Response>,
                ) {
                    (stringify!($name), utoipa::openapi::RefOr::T($build))
                }
            }
        )*
    };
}
pub(crate) use problem_response;

problem_response! {
    /// 401 `unauthorized`.
    Unauthorized => problem(
        401,
        "`unauthorized`: the `Authorization: Bearer <key>` header is missing, malformed, or names \
         no key.",
        &["unauthorized"],
        &[("Unauthorized", "send a valid API key as `Authorization: Bearer <key>`")],
    );
    /// 404 `not_found`.
    NotFound => problem(
        404,
        "`not_found`: the object does not exist, its id is malformed, it belongs to someone \
         else, or the caller's kind of key may not use this route.",
        &["not_found"],
        &[("Not found", "no such payment")],
    );
    /// 422 for a query parameter.
    ValidationFailed => problem(
        422,
        "`validation_failed`: a query parameter is invalid; `detail` says which.",
        &["validation_failed"],
        &[("Validation failed", "`limit` must be a whole number from 1 to 100")],
    );
    /// 422 for a request body or its idempotency key.
    UnprocessableRequest => problem(
        422,
        "`validation_failed`: the body is missing, not JSON, has unknown fields or wrong types, \
         or a value is invalid (`detail` says which), or the `Idempotency-Key` is malformed. \
         `idempotency_key_reused`: the `Idempotency-Key` was already used by this API key with a \
         different request.",
        &["validation_failed", "idempotency_key_reused"],
        &[
            ("Validation failed", "`amount` is not valid: more than 6 decimal places"),
            (
                "Idempotency key reused",
                "this Idempotency-Key was used with a different request",
            ),
        ],
    );
    /// 422 for a refund.
    UnprocessableRefund => problem_with_example(
        problem(
            422,
            "`validation_failed`: the body is not JSON, has unknown fields or wrong types, or \
             `amount` is invalid, or the `Idempotency-Key` is malformed. \
             `idempotency_key_reused`: the `Idempotency-Key` was already used by this API key \
             with a different request. `refund_exceeds_payment`: the refund is larger than what \
             is left of the payment, or nothing is left.",
            &["validation_failed", "idempotency_key_reused", "refund_exceeds_payment"],
            &[],
        ),
        problem_example(
            422,
            "refund_exceeds_payment",
            "Refund exceeds payment",
            "the refund is larger than what is left of the payment",
        ),
    );
    /// 409 for a capture or cancel of a payment that is not held, and for a refund of one
    /// whose money never moved.
    HoldConflict => problem(
        409,
        "`payment_not_held`: the payment is not waiting for capture (it was paid at once, or \
         its hold was already captured, canceled or expired). `hold_expired`: the hold's \
         `capture_before` has passed. `payment_not_captured`: a refund of a payment whose money \
         never moved (held, canceled or expired).",
        &["payment_not_held", "hold_expired", "payment_not_captured"],
        &[(
            "Payment not held",
            "the payment is not waiting for capture: it was paid at once, or its hold was \
             already captured, canceled or expired",
        )],
    );
    /// 402 `insufficient_funds`.
    InsufficientFunds => problem(
        402,
        "`insufficient_funds`: the available balance does not cover the amount (for a payment, \
         the payer's wallet in that currency; for a refund, the merchant's balance). Kept for \
         the `Idempotency-Key` and replayed on retry.",
        &["insufficient_funds"],
        &[("Insufficient funds", "the wallet's available balance does not cover this payment")],
    );
    /// 402 `funding_declined`.
    FundingDeclined => problem(
        402,
        "`funding_declined`: the funding source declined the top-up. Kept for the \
         `Idempotency-Key` and replayed on retry.",
        &["funding_declined"],
        &[("Funding declined", "the funding provider declined this top-up")],
    );
    /// 413 `payload_too_large`.
    PayloadTooLarge => problem(
        413,
        "`payload_too_large`: the body is larger than the route allows (64 KiB; 8 MiB for \
         `POST /v1/payments/batch`).",
        &["payload_too_large"],
        &[("Payload too large", "the request body is larger than 65536 bytes")],
    );
    /// 429 `rate_limited`, with `Retry-After`.
    RateLimited => {
        let mut response = problem(
            429,
            "`rate_limited`: this API key sent more requests than its rate limit allows; retry \
             after `Retry-After` seconds.",
            &["rate_limited"],
            &[(
                "Too many requests",
                "this API key sent more requests than its rate limit allows; retry shortly",
            )],
        );
        response.headers.insert(
            "Retry-After".to_string(),
            RefOr::Ref(Ref::new("#/components/headers/RetryAfter")),
        );
        response
    };
    /// 500 `internal_error`.
    InternalError => problem(
        500,
        "`internal_error`: something went wrong on the server's side.",
        &["internal_error"],
        &[],
    );
    /// 503 on a read.
    Unavailable => problem(
        503,
        UNAVAILABLE,
        &["shutting_down", "storage_unavailable"],
        &[(
            "Shutting down",
            "the server is shutting down; retry against another instance or later",
        )],
    );
    /// 503 on a write, which may also be `retry`.
    UnavailableWrite => problem_with_example(
        problem(
            503,
            &format!(
                "{UNAVAILABLE} `retry`: a generated id was already taken; retry the request \
                 (with the same `Idempotency-Key`, it is safe)."
            ),
            &["shutting_down", "storage_unavailable", "retry"],
            &[],
        ),
        problem_example(
            503,
            "storage_unavailable",
            "Storage unavailable",
            "storage is unavailable; retry later",
        ),
    );
}

const UNAVAILABLE: &str = "`shutting_down`: the server is draining before it exits; retry \
    against another instance or later. `storage_unavailable`: storage refused the write (a full \
    disk, say) or the database cannot be reached; nothing was acknowledged, so retry later, with \
    the same `Idempotency-Key` to be safe (if the database failed while committing, the retry \
    gets the first answer).";

/// An `application/problem+json` response of `status` whose code is one of `codes`, with an
/// example for each `(title, detail)` given: one example is the media type's `example`, several
/// are its `examples`, named by code and in the order of `codes`.
pub(crate) fn problem(
    status: u16,
    description: &str,
    codes: &[&str],
    examples: &[(&str, &str)],
) -> Response {
    let code = if let [code] = codes {
        constant_bare(json!(code))
    } else {
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .enum_values(Some(codes.iter().copied()))
            .build()
    };
    let pinned = ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .property("status", constant_bare(json!(status)))
        .property("code", code)
        .build();
    let schema = AllOfBuilder::new()
        .item(reference::<error::Problem>())
        .item(pinned)
        .build();
    let mut content = ContentBuilder::new().schema(Some(Schema::AllOf(schema)));
    match examples {
        [] => {}
        [(title, detail)] => {
            content = content.example(Some(problem_example(status, codes[0], title, detail)));
        }
        several => {
            content = content.examples_from_iter(several.iter().zip(codes).map(
                |((title, detail), code)| {
                    (
                        code.to_string(),
                        ExampleBuilder::new()
                            .value(Some(problem_example(status, code, title, detail)))
                            .build(),
                    )
                },
            ));
        }
    }
    ResponseBuilder::new()
        .description(description)
        .content("application/problem+json", content.build())
        .build()
}

/// `response` with `example` as its one example, for a problem whose example is not of its
/// first code.
pub(crate) fn problem_with_example(mut response: Response, example: Value) -> Response {
    for content in response.content.values_mut() {
        if let RefOr::T(content) = content {
            content.example = Some(example.clone());
        }
    }
    response
}

pub(crate) fn problem_example(status: u16, code: &str, title: &str, detail: &str) -> Value {
    serde_json::to_value(error::Problem::new(status, code, title, detail))
        .expect("a problem serializes")
}

// Schemas that are not the type of a Rust value the server parses or renders: strings whose
// form the server checks (ids, amounts, currencies) and the batch results, which the handler
// writes directly. These types are never built: each only names a schema, and the string
// newtypes' field gives it its type.

/// A positive amount in a request.
#[derive(ToSchema)]
#[schema(
    description = "A positive amount as a decimal string with at most 6 fractional digits: no \
        sign, exponent or spaces. It must be greater than zero and at most the server's maximum \
        per request (10000 by default, `FARTHING_AMOUNT_MAX`); JSON numbers are refused.",
    pattern = r"^[0-9]+(\.[0-9]{1,6})?$",
    examples("0.0025", "12", "1.5")
)]
#[allow(dead_code)]
pub struct Amount(String);

/// A fixed fee in a request.
#[derive(ToSchema)]
#[schema(
    description = "A fixed fee as a decimal string with at most 6 fractional digits; may be zero.",
    pattern = r"^[0-9]+(\.[0-9]{1,6})?$",
    examples("0", "0.0001")
)]
#[allow(dead_code)]
pub struct FeeAmount(String);

/// An amount in an answer.
#[derive(ToSchema)]
#[schema(
    description = "An amount as the server writes it: a decimal string with 2 to 6 fractional \
        digits.",
    pattern = r"^[0-9]+\.[0-9]{2,6}$",
    examples("1.00", "0.0025", "0.000001")
)]
#[allow(dead_code)]
pub struct AmountOut(String);

/// A balance in an answer.
#[derive(ToSchema)]
#[schema(
    description = "A balance as the server writes it: a decimal string with 2 to 6 fractional \
        digits, negative only for accounts that have no lower limit.",
    pattern = r"^-?[0-9]+\.[0-9]{2,6}$",
    examples("4.9975")
)]
#[allow(dead_code)]
pub struct SignedAmountOut(String);

/// A currency code.
#[derive(ToSchema)]
#[schema(
    description = "An ISO 4217 code, matched without regard to case (`usd` is USD); responses \
        use upper case. The server accepts those the operator enabled (`FARTHING_CURRENCIES`; by \
        default USD, EUR, GBP, KES, NGN, INR, JPY, BRL, ZAR); others are 422 \
        `validation_failed`.",
    pattern = "^[A-Za-z]{3}$",
    examples("USD")
)]
#[allow(dead_code)]
pub struct Currency(String);

/// A time in an answer.
pub struct Timestamp;

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .description(Some("A time, in seconds since the Unix epoch."))
            .minimum(Some(0))
            .examples([1_767_225_600])
            .into()
    }
}

impl ToSchema for Timestamp {}

/// A description or reference.
#[derive(ToSchema)]
#[schema(
    description = "At most 500 characters, none of them control characters.",
    max_length = 500,
    pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"
)]
#[allow(dead_code)]
pub struct Text(String);

/// A merchant's or payer's name.
#[derive(ToSchema)]
#[schema(
    description = "A name. Surrounding whitespace is trimmed and the trimmed name is kept; it \
        must then be 1 to 500 characters with no control characters. A blank name is 422 \
        `validation_failed`.",
    min_length = 1,
    examples("Acme News")
)]
#[allow(dead_code)]
pub struct Name(String);

macro_rules! id_schema {
    ($($name:ident: $prefix:literal, $what:literal;)*) => {
        $(
            #[doc = concat!("A ", $what, "'s id.")]
            pub struct $name;

            impl PartialSchema for $name {
                fn schema() -> RefOr<Schema> {
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some(concat!(
                            "A ", $what, "'s id: `", $prefix,
                            "_` and 26 lowercase Crockford base32 digits."
                        )))
                        .pattern(Some(concat!("^", $prefix, "_[0-7][0-9a-hjkmnp-tv-z]{25}$")))
                        .examples([concat!($prefix, "_01j9z3k8q2x7v5m4n6p8r0t2w4")])
                        .into()
                }
            }

            impl ToSchema for $name {}
        )*
    };
}

id_schema! {
    MerchantId: "mer", "merchant";
    PayerId: "pyr", "payer";
    PaymentId: "pay", "payment";
    TopupId: "top", "top-up";
    RefundId: "ref", "refund";
}

// The answer to a batch of payments, which the handler writes as it goes.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct BatchResults {
    /// One result per item of `payments`, in the same order.
    results: Vec<BatchResult>,
}

/// One item's result in a batch.
pub struct BatchResult;

impl PartialSchema for BatchResult {
    fn schema() -> RefOr<Schema> {
        let succeeded = ObjectBuilder::new()
            .title(Some("Succeeded"))
            .required("id")
            .required("status")
            .property("id", reference::<PaymentId>())
            .property("status", constant(Type::String, json!("succeeded")));
        let failed = ObjectBuilder::new()
            .title(Some("Failed"))
            .required("status")
            .required("code")
            .property("status", constant(Type::String, json!("failed")))
            .property(
                "code",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some(
                        "Why the item failed, as a `Problem` code: `validation_failed` (the \
                         item is not a valid payment, or its amount would overflow a balance), \
                         `not_found` (no such payer or merchant), `insufficient_funds` (the \
                         payer's wallet does not cover it), `retry` (a generated id was taken; \
                         send the item again).",
                    ))
                    .enum_values(Some([
                        "validation_failed",
                        "not_found",
                        "insufficient_funds",
                        "retry",
                    ])),
            );
        OneOfBuilder::new()
            .item(succeeded)
            .item(failed)
            .schema_type(SchemaType::AnyValue)
            .into()
    }
}

impl ToSchema for BatchResult {}

// Helpers for `#[schema(schema_with = ...)]` on fields whose schema the derive cannot write.

/// A `$ref` to `T`'s schema.
pub fn reference<T: ToSchema>() -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(T::name()))
}

/// JSON Schema's `const`, for which utoipa's schema has no field: it is written through the
/// extensions map, whose keys are serialized as they are.
fn with_const(mut object: Object, value: Value) -> Object {
    object
        .extensions
        .get_or_insert_with(Extensions::default)
        .insert("const".to_string(), value);
    object
}

/// A value of `kind` that is always `value`.
fn constant(kind: Type, value: Value) -> Object {
    with_const(ObjectBuilder::new().schema_type(kind).build(), value)
}

/// A value that is always `value`, of no stated type.
fn constant_bare(value: Value) -> Object {
    with_const(
        ObjectBuilder::new()
            .schema_type(SchemaType::AnyValue)
            .build(),
        value,
    )
}

/// `T`, or `null` (an absent optional field reads as the same).
fn optional<T: ToSchema>(description: &str) -> Schema {
    AnyOfBuilder::new()
        .description(Some(description))
        .item(reference::<T>())
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .schema_type(SchemaType::AnyValue)
        .into()
}

/// The id of what moved a payer's money: a top-up, a payment or a refund.
fn entry_id(description: Option<&str>) -> Schema {
    AnyOfBuilder::new()
        .description(description)
        .item(reference::<TopupId>())
        .item(reference::<PaymentId>())
        .item(reference::<RefundId>())
        .schema_type(SchemaType::AnyValue)
        .into()
}

fn string_enum(description: Option<&str>, values: &[&str]) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(description)
        .enum_values(Some(values.iter().copied()))
        .build()
}

pub fn object_of(name: &str) -> Object {
    constant(Type::String, json!(name))
}

pub fn object_merchant() -> Object {
    object_of("merchant")
}

pub fn object_payer() -> Object {
    object_of("payer")
}

pub fn object_topup() -> Object {
    object_of("topup")
}

pub fn object_payment() -> Object {
    object_of("payment")
}

pub fn object_refund() -> Object {
    object_of("refund")
}

pub fn object_ledger_entry() -> Object {
    object_of("ledger_entry")
}

pub fn object_list() -> Object {
    object_of("list")
}

pub fn object_test_clock() -> Object {
    object_of("test_clock")
}

pub fn status_ok() -> Object {
    constant(Type::String, json!("ok"))
}

pub fn status_succeeded() -> Object {
    constant(Type::String, json!("succeeded"))
}

pub fn topup_status() -> Object {
    let mut schema = status_succeeded();
    schema.description = Some(
        "Always `succeeded`: a declined top-up is answered 402 `funding_declined` instead."
            .to_string(),
    );
    schema
}

pub fn payment_status() -> Object {
    string_enum(
        Some(
            "`succeeded`: the money moved (a payment that fails is not created). \
             `requires_capture`: made with `capture_method` `manual`, its amount is held until \
             it is captured or canceled. `canceled`: a held payment canceled or expired; its \
             money went back to the payer.",
        ),
        &["succeeded", "requires_capture", "canceled"],
    )
}

pub fn capture_method() -> Schema {
    let mut schema = string_enum(
        Some(
            "`automatic` (default): the money moves at once. `manual`: the amount is held for \
             the merchant to capture or cancel.",
        ),
        &["automatic", "manual"],
    );
    schema.schema_type = SchemaType::from_iter([Type::String, Type::Null]);
    Schema::Object(schema)
}

pub fn capture_method_out() -> Object {
    string_enum(None, &["automatic", "manual"])
}

pub fn cancellation_reason() -> Object {
    string_enum(None, &["requested", "expired"])
}

pub fn hold_seconds() -> Schema {
    Schema::Object(
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
            .minimum(Some(1))
            .maximum(Some(farthing_payments::HOLD_SECS_MAX))
            .description(Some(
                "With `capture_method` `manual` only: how long the hold waits for capture, in \
                 seconds (default 604,800: 7 days).",
            ))
            .build(),
    )
}

pub fn capture_amount_request() -> Schema {
    optional::<Amount>("How much to capture. Default (absent or null): all that was authorized.")
}

pub fn funding_source() -> Object {
    string_enum(None, &["sandbox", "sandbox_decline"])
}

pub fn funding_source_request() -> Object {
    string_enum(
        Some(
            "Where the money comes from: `sandbox` succeeds, `sandbox_decline` is declined with \
             402 `funding_declined`.",
        ),
        &["sandbox", "sandbox_decline"],
    )
}

pub fn entry_type() -> Object {
    string_enum(
        Some("What moved the money."),
        &["topup", "payment", "refund"],
    )
}

pub fn entry_direction() -> Object {
    string_enum(
        Some(
            "`credit` for money into the wallet (top-ups, refunds), `debit` for money out \
             (payments).",
        ),
        &["credit", "debit"],
    )
}

pub fn ledger_entry_id() -> Schema {
    entry_id(Some(
        "The id of the top-up, payment or refund that moved the money; usable as \
         `starting_after`.",
    ))
}

fn fee_bps(nullable: bool, description: &str) -> Object {
    let kind: SchemaType = if nullable {
        [Type::Integer, Type::Null].into_iter().collect()
    } else {
        Type::Integer.into()
    };
    ObjectBuilder::new()
        .schema_type(kind)
        .description(Some(description))
        .minimum(Some(0))
        .maximum(Some(farthing_payments::FEE_BPS_MAX))
        .build()
}

pub fn fee_bps_request() -> Object {
    fee_bps(
        true,
        "The proportional fee, in basis points of the amount (100 = 1%). Default: the server's \
         default fee.",
    )
}

pub fn fee_bps_view() -> Object {
    fee_bps(false, "The proportional fee in basis points.")
}

pub fn fee_fixed_request() -> Schema {
    optional::<FeeAmount>(
        "A fixed fee added to each payment's proportional fee. Default: the server's default fee.",
    )
}

pub fn optional_description() -> Schema {
    optional::<Text>("Free text for people.")
}

pub fn optional_reference() -> Schema {
    optional::<Text>("The caller's own reference, such as an order number.")
}

pub fn refund_amount_request() -> Schema {
    optional::<Amount>(
        "How much to refund. Default (absent or null): all that is left of the payment.",
    )
}

pub fn batch_items() -> ArrayBuilder {
    ArrayBuilder::new()
        .description(Some(
            "1 to 8,190 payments, each a JSON object (anything else refuses the whole batch with \
             422 `validation_failed`). The objects are checked one by one, each as a \
             `BatchPaymentItem` (see that schema): one that is not a valid payment (a field \
             missing, malformed or unknown) fails in place with `validation_failed`, and the \
             others go ahead. So the batch as a whole only needs objects here.",
        ))
        .min_items(Some(1))
        .max_items(Some(farthing_service::PAYMENTS_PER_BATCH_MAX))
        .items(
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .description(Some(
                    "A payment, as `BatchPaymentItem` describes it; checked in place.",
                )),
        )
}

pub fn advance_seconds() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .maximum(Some(farthing_service::TEST_CLOCK_ADVANCE_SECS_MAX))
        .description(Some(
            "Whole seconds to move the clock forward: time only moves forward.",
        ))
        .build()
}

pub fn now_rfc3339() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(
            utoipa::openapi::schema::KnownFormat::DateTime,
        )))
        .description(Some("The time now, RFC 3339 in UTC, to the second."))
        .examples(["2026-12-05T10:00:00Z"])
        .build()
}

pub fn now_unix() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .description(Some(
            "The same time in Unix seconds, as `created_at` fields give times.",
        ))
        .build()
}

pub fn problem_status() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .description(Some("The HTTP status code."))
        .minimum(Some(400))
        .maximum(Some(599))
        .build()
}
