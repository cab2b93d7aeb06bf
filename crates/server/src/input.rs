//! Request bodies: parsed strictly at the edge into domain types, or refused with a 4xx.

use std::fmt;
use std::marker::PhantomData;

use axum::http::{HeaderMap, header};
use farthing_ledger::{Amount, AmountParseError, Currency};
use farthing_payments::{
    FEE_BPS_MAX, FeeSchedule, HOLD_SECS_DEFAULT, HOLD_SECS_MAX, MerchantId, PayerId,
};
use farthing_service::Config;
use serde::de::{DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, de};
use serde_json::Value;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::openapi;

/// Characters a name, description or reference may have at most.
pub const TEXT_CHARS_MAX: usize = 500;

/// Refuses a body that is not declared as JSON (`application/json`, or any `+json` type,
/// with any parameters) with 415. An empty (or blank) body needs no type.
pub fn require_json_type(headers: &HeaderMap, body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        Some(essence) if essence.starts_with("application/") && essence.ends_with("+json") => {
            Ok(())
        }
        _ => Err(ApiError::unsupported_media_type()),
    }
}

/// Parses a JSON object body, refusing other JSON values (an array in place of an object),
/// unknown fields and wrong types with a 422.
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::validation("the request needs a JSON body"));
    }
    serde_json::from_slice::<Object<T>>(body)
        .map(|object| object.0)
        .map_err(|error| ApiError::validation(format!("invalid JSON body: {error}")))
}

/// A `T` read only from a JSON object. Serde's derived structs also accept a JSON array of
/// their fields in order; requests never may, so every request struct is read through this.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

/// The canonical form of a JSON body, for comparing two requests under one idempotency key:
/// members sorted by name, members whose value is `null` left out (as an absent optional
/// field), no whitespace. The same request re-serialized (other spacing, another member
/// order) has the same canonical form. An empty body reads as `{}`. `None` when the body is
/// not JSON (such a request is refused before its key is looked at).
pub fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Some(b"{}".to_vec());
    }
    let value: Value = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out);
    Some(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(members) => {
            let mut members: Vec<(&String, &Value)> =
                members.iter().filter(|(_, v)| !v.is_null()).collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (name, member)) in members.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name).expect("a string serializes");
                out.push(b':');
                write_canonical(member, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("a scalar serializes"),
    }
}

/// A positive amount within the configured maximum, from its decimal string.
pub fn amount(field: &str, text: &str, config: &Config) -> Result<Amount, ApiError> {
    let amount = Amount::parse_decimal(text).map_err(|error| {
        let reason = match error {
            AmountParseError::TooLarge => "is too large".to_string(),
            other => format!("is not valid: {other}"),
        };
        ApiError::validation(format!("`{field}` {reason}"))
    })?;
    if amount.is_zero() {
        return Err(ApiError::validation(format!(
            "`{field}` must be greater than zero"
        )));
    }
    if amount > config.amount_max {
        return Err(ApiError::validation(format!(
            "`{field}` is above the maximum of {} per request",
            config.amount_max
        )));
    }
    Ok(amount)
}

/// A currency the server accepts. Codes are matched without regard to case, as Stripe does
/// (`usd` is USD); responses always use the uppercase code.
pub fn currency(text: &str, config: &Config) -> Result<Currency, ApiError> {
    match Currency::parse(&text.to_ascii_uppercase()) {
        Some(currency) if config.currencies.contains(&currency) => Ok(currency),
        _ => Err(ApiError::validation(format!(
            "`currency` {text:?} is not one this server accepts ({})",
            config
                .currencies
                .iter()
                .map(|c| c.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// A required, non-blank text of bounded length.
pub fn name(field: &str, text: &str) -> Result<String, ApiError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(ApiError::validation(format!("`{field}` must not be empty")));
    }
    optional_text(field, Some(trimmed.to_string())).map(|t| t.expect("present"))
}

pub fn optional_text(field: &str, text: Option<String>) -> Result<Option<String>, ApiError> {
    match text {
        Some(text) if text.chars().count() > TEXT_CHARS_MAX => Err(ApiError::validation(format!(
            "`{field}` is longer than {TEXT_CHARS_MAX} characters"
        ))),
        Some(text) if text.chars().any(is_hidden) => Err(ApiError::validation(format!(
            "`{field}` must not contain control, formatting or invisible characters \
             (such as U+202E RIGHT-TO-LEFT OVERRIDE or U+200B ZERO WIDTH SPACE)"
        ))),
        other => Ok(other),
    }
}

/// Characters that change how the text around them shows, or show as nothing, and so could
/// disguise a name: control characters (Cc), format characters such as bidirectional
/// overrides and zero-width joiners (Cf), line and paragraph separators (Zl, Zp), surrogates,
/// private-use and unassigned code points.
fn is_hidden(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::Surrogate
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
    )
}

pub fn merchant_id(field: &str, text: &str) -> Result<MerchantId, ApiError> {
    MerchantId::parse(text)
        .ok_or_else(|| ApiError::validation(format!("`{field}` is not a merchant id (mer_…)")))
}

pub fn payer_id(field: &str, text: &str) -> Result<PayerId, ApiError> {
    PayerId::parse(text)
        .ok_or_else(|| ApiError::validation(format!("`{field}` is not a payer id (pyr_…)")))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateMerchantRequest)]
pub struct CreateMerchant {
    #[schema(value_type = openapi::Name)]
    pub name: String,
    #[schema(schema_with = openapi::fee_bps_request)]
    pub fee_bps: Option<u32>,
    #[schema(schema_with = openapi::fee_fixed_request)]
    pub fee_fixed: Option<String>,
}

impl CreateMerchant {
    /// The merchant's fee schedule, or `None` for the server's default. A fixed fee above
    /// the largest amount a request may move could never be charged in full: it is refused.
    pub fn fee(&self, config: &Config) -> Result<Option<FeeSchedule>, ApiError> {
        let default = config.default_fee;
        if self.fee_bps.is_none() && self.fee_fixed.is_none() {
            return Ok(None);
        }
        let bps = self.fee_bps.unwrap_or(default.bps);
        if bps > FEE_BPS_MAX {
            return Err(ApiError::validation(format!(
                "`fee_bps` must be between 0 and {FEE_BPS_MAX}"
            )));
        }
        let fixed = match &self.fee_fixed {
            None => default.fixed,
            Some(text) => Amount::parse_decimal(text).map_err(|error| {
                ApiError::validation(format!("`fee_fixed` is not valid: {error}"))
            })?,
        };
        if fixed > config.amount_max {
            return Err(ApiError::validation(format!(
                "`fee_fixed` must be at most {}, the largest amount a request may move",
                config.amount_max
            )));
        }
        Ok(Some(FeeSchedule { bps, fixed }))
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreatePayerRequest)]
pub struct CreatePayer {
    #[schema(value_type = openapi::Name)]
    pub name: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateTopupRequest)]
pub struct CreateTopup {
    #[schema(value_type = openapi::Amount)]
    pub amount: String,
    #[schema(value_type = openapi::Currency)]
    pub currency: String,
    #[schema(schema_with = openapi::funding_source_request)]
    pub source: String,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreatePaymentRequest)]
pub struct CreatePayment {
    #[schema(value_type = openapi::MerchantId)]
    pub merchant: String,
    #[schema(value_type = openapi::Amount)]
    pub amount: String,
    #[schema(value_type = openapi::Currency)]
    pub currency: String,
    #[schema(schema_with = openapi::optional_description)]
    pub description: Option<String>,
    #[schema(schema_with = openapi::optional_reference)]
    pub reference: Option<String>,
    #[schema(schema_with = openapi::capture_method)]
    pub capture_method: Option<String>,
    #[schema(schema_with = openapi::hold_seconds)]
    pub hold_seconds: Option<u64>,
}

impl CreatePayment {
    /// How long the money is to be held for capture, or `None` to pay at once.
    pub fn hold_seconds(&self) -> Result<Option<u64>, ApiError> {
        let manual = match self.capture_method.as_deref() {
            None | Some("automatic") => false,
            Some("manual") => true,
            Some(_) => {
                return Err(ApiError::validation(
                    "`capture_method` must be \"automatic\" or \"manual\"",
                ));
            }
        };
        match (manual, self.hold_seconds) {
            (false, None) => Ok(None),
            (false, Some(_)) => Err(ApiError::validation(
                "`hold_seconds` applies only with `\"capture_method\": \"manual\"`",
            )),
            (true, None) => Ok(Some(HOLD_SECS_DEFAULT)),
            (true, Some(secs)) if (1..=HOLD_SECS_MAX).contains(&secs) => Ok(Some(secs)),
            (true, Some(_)) => Err(ApiError::validation(format!(
                "`hold_seconds` must be a whole number from 1 to {HOLD_SECS_MAX}"
            ))),
        }
    }
}

/// A body whose only field is an optional `amount`: a refund's, a capture's
/// (`rooms::holds`).
pub trait OptionalAmount {
    fn amount(&self) -> Option<&str>;
}

impl OptionalAmount for CreateRefund {
    fn amount(&self) -> Option<&str> {
        self.amount.as_deref()
    }
}

// A batch read item by item. Its schema asks only for objects, as the handler does: each is
// then checked as a `BatchItem` on its own, and one that is not a valid payment fails in place.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchPaymentsRequest)]
pub struct BatchPayments {
    #[schema(schema_with = openapi::batch_items)]
    pub payments: Vec<serde_json::Value>,
}

impl BatchPayments {
    /// The items, each a JSON object: anything else refuses the whole batch, while an object
    /// that is not a valid payment fails in place.
    pub fn objects(self) -> Result<Vec<Value>, ApiError> {
        if let Some(position) = self.payments.iter().position(|item| !item.is_object()) {
            return Err(ApiError::validation(format!(
                "`payments[{position}]` is not a JSON object"
            )));
        }
        Ok(self.payments)
    }
}

/// A batch whose every item is well formed: parsed in one pass. When this fails, the batch is
/// parsed again item by item so that each bad item gets its own answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPaymentsTyped {
    pub payments: Vec<Object<BatchItem>>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = BatchPaymentItem)]
pub struct BatchItem {
    #[schema(value_type = openapi::PayerId)]
    pub payer: String,
    #[schema(value_type = openapi::MerchantId)]
    pub merchant: String,
    #[schema(value_type = openapi::Amount)]
    pub amount: String,
    #[schema(value_type = openapi::Currency)]
    pub currency: String,
    #[schema(schema_with = openapi::optional_description)]
    pub description: Option<String>,
    #[schema(schema_with = openapi::optional_reference)]
    pub reference: Option<String>,
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateRefundRequest)]
pub struct CreateRefund {
    #[schema(schema_with = openapi::refund_amount_request)]
    pub amount: Option<String>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AdvanceTestClockRequest)]
pub struct AdvanceTestClock {
    // Whole seconds, zero or more: a negative number or a fraction is refused.
    #[schema(schema_with = openapi::advance_seconds)]
    pub advance_seconds: u64,
}

/// `?limit=N&starting_after=ID`.
#[derive(Deserialize)]
pub struct ListQuery {
    pub limit: Option<String>,
    pub starting_after: Option<String>,
}

/// Items in one page at most, and by default.
pub const PAGE_ITEMS_MAX: usize = 100;
pub const PAGE_ITEMS_DEFAULT: usize = 10;

impl ListQuery {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match &self.limit {
            None => Ok(PAGE_ITEMS_DEFAULT),
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=PAGE_ITEMS_MAX).contains(&n) => Ok(n),
                _ => Err(ApiError::validation(format!(
                    "`limit` must be a whole number from 1 to {PAGE_ITEMS_MAX}"
                ))),
            },
        }
    }
}
