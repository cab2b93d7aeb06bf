//! Request bodies: parsed strictly at the edge into domain types, or refused with a 422.

use farthing_ledger::{Amount, AmountParseError, Currency};
use farthing_payments::{FEE_BPS_MAX, FeeSchedule, MerchantId, PayerId};
use farthing_service::Config;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Characters a name, description or reference may have at most.
pub const TEXT_CHARS_MAX: usize = 500;

/// Parses a JSON body, refusing unknown fields and wrong types with a 422.
pub fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::validation("the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|error| ApiError::validation(format!("invalid JSON body: {error}")))
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
        Some(text) if text.chars().any(|c| c.is_control()) => Err(ApiError::validation(format!(
            "`{field}` must not contain control characters"
        ))),
        other => Ok(other),
    }
}

pub fn merchant_id(field: &str, text: &str) -> Result<MerchantId, ApiError> {
    MerchantId::parse(text)
        .ok_or_else(|| ApiError::validation(format!("`{field}` is not a merchant id (mer_…)")))
}

pub fn payer_id(field: &str, text: &str) -> Result<PayerId, ApiError> {
    PayerId::parse(text)
        .ok_or_else(|| ApiError::validation(format!("`{field}` is not a payer id (pyr_…)")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateMerchant {
    pub name: String,
    pub fee_bps: Option<u32>,
    pub fee_fixed: Option<String>,
}

impl CreateMerchant {
    /// The merchant's fee schedule, or `None` for the server's default.
    pub fn fee(&self, default: FeeSchedule) -> Result<Option<FeeSchedule>, ApiError> {
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
        Ok(Some(FeeSchedule { bps, fixed }))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePayer {
    pub name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopup {
    pub amount: String,
    pub currency: String,
    pub source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePayment {
    pub merchant: String,
    pub amount: String,
    pub currency: String,
    pub description: Option<String>,
    pub reference: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPayments {
    pub payments: Vec<serde_json::Value>,
}

/// A batch whose every item is well formed: parsed in one pass. When this fails, the batch is
/// parsed again item by item so that each bad item gets its own answer.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPaymentsTyped {
    pub payments: Vec<BatchItem>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    pub payer: String,
    pub merchant: String,
    pub amount: String,
    pub currency: String,
    pub description: Option<String>,
    pub reference: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    pub amount: Option<String>,
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
