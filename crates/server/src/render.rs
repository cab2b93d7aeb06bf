//! JSON views of Farthing's objects. Amounts are decimal strings; times are Unix seconds.

use farthing_ledger::{Amount, Currency, Timestamp};
use farthing_payments::{Entry, EntryObject, HoldStatus, Merchant, Payer, Payment, Refund, Topup};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::openapi;

pub fn seconds(time: Timestamp) -> u64 {
    time.0 / 1_000_000
}

// `GET /healthz`'s answer.
#[derive(Serialize, ToSchema)]
pub struct Health {
    #[schema(schema_with = openapi::status_ok)]
    status: &'static str,
}

pub fn health() -> Value {
    to_value(Health { status: "ok" })
}

/// A view as the `Value` the handlers answer with. A `Value` writes its members sorted by name,
/// as the answers always were, whatever the order of the view's fields.
fn to_value(view: impl Serialize) -> Value {
    serde_json::to_value(view).expect("a view serializes")
}

#[derive(Serialize, ToSchema)]
#[schema(as = Merchant)]
pub struct MerchantView<'a> {
    #[schema(value_type = openapi::MerchantId)]
    id: String,
    #[schema(schema_with = openapi::object_merchant)]
    object: &'static str,
    name: &'a str,
    #[schema(schema_with = openapi::fee_bps_view)]
    fee_bps: u32,
    #[schema(value_type = openapi::AmountOut)]
    fee_fixed: String,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
    /// The merchant's API key: present only when the merchant is created. Store it; it is not shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^fk_mer_[0-9a-f]{64}$")]
    api_key: Option<&'a str>,
}

pub fn merchant(merchant: &Merchant, api_key: Option<&str>) -> Value {
    to_value(MerchantView {
        id: merchant.id.to_string(),
        object: "merchant",
        name: &merchant.name,
        fee_bps: merchant.fee.bps,
        fee_fixed: merchant.fee.fixed.to_string(),
        created_at: seconds(merchant.created_at),
        api_key,
    })
}

#[derive(Serialize, ToSchema)]
#[schema(as = Payer)]
pub struct PayerView<'a> {
    #[schema(value_type = openapi::PayerId)]
    id: String,
    #[schema(schema_with = openapi::object_payer)]
    object: &'static str,
    name: &'a str,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
    /// The payer's API key: present only when the payer is created. Store it; it is not shown again.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false, pattern = "^fk_pyr_[0-9a-f]{64}$")]
    api_key: Option<&'a str>,
}

pub fn payer(payer: &Payer, api_key: Option<&str>) -> Value {
    to_value(PayerView {
        id: payer.id.to_string(),
        object: "payer",
        name: &payer.name,
        created_at: seconds(payer.created_at),
        api_key,
    })
}

#[derive(Serialize, ToSchema)]
#[schema(as = Topup)]
pub struct TopupView<'a> {
    #[schema(value_type = openapi::TopupId)]
    id: String,
    #[schema(schema_with = openapi::object_topup)]
    object: &'static str,
    #[schema(schema_with = openapi::topup_status)]
    status: &'static str,
    #[schema(value_type = openapi::PayerId)]
    payer: String,
    #[schema(value_type = openapi::AmountOut)]
    amount: String,
    #[schema(value_type = openapi::Currency)]
    currency: &'a str,
    #[schema(schema_with = openapi::funding_source)]
    source: &'static str,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
}

pub fn topup(topup: &Topup) -> Value {
    to_value(TopupView {
        id: topup.id.to_string(),
        object: "topup",
        status: "succeeded",
        payer: topup.payer.to_string(),
        amount: topup.amount.to_string(),
        currency: topup.currency.as_str(),
        source: match topup.source {
            farthing_payments::FundingSource::Sandbox => "sandbox",
            farthing_payments::FundingSource::SandboxDecline => "sandbox_decline",
        },
        created_at: seconds(topup.created_at),
    })
}

// The payment view is serialized directly where it is answered alone: the hottest response of
// the API, so it skips the intermediate `Value` tree.
#[derive(Serialize, ToSchema)]
#[schema(as = Payment)]
pub struct PaymentView<'a> {
    #[schema(value_type = openapi::PaymentId)]
    id: String,
    #[schema(schema_with = openapi::object_payment)]
    object: &'static str,
    #[schema(schema_with = openapi::payment_status)]
    status: &'static str,
    #[schema(value_type = openapi::PayerId)]
    payer: String,
    #[schema(value_type = openapi::MerchantId)]
    merchant: String,
    #[schema(value_type = openapi::AmountOut)]
    amount: String,
    #[schema(value_type = openapi::Currency)]
    currency: &'a str,
    /// The platform's fee: `floor(amount × fee_bps / 10000) + fee_fixed`, never more than `amount`.
    #[schema(value_type = openapi::AmountOut)]
    fee: String,
    /// What the merchant received: `amount − fee`.
    #[schema(value_type = openapi::AmountOut)]
    net: String,
    /// How much of `amount` has been refunded so far.
    #[schema(value_type = openapi::AmountOut)]
    amount_refunded: String,
    /// Whether the whole amount has been refunded (`amount_refunded` equals `amount`). `status` stays `succeeded`: the payment happened; refunds are their own objects.
    refunded: bool,
    #[schema(required = true)]
    description: &'a Option<String>,
    #[schema(required = true)]
    reference: &'a Option<String>,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
    /// `automatic`: the money moved when the payment was made. `manual`: it was held, to be captured or canceled.
    #[schema(schema_with = openapi::capture_method_out)]
    capture_method: &'static str,
    /// For a held payment: what was authorized (`amount` is what was captured, once it is).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::AmountOut>)]
    amount_authorized: Option<String>,
    /// For a payment still held: until when it may be captured; afterwards its hold expires and the money goes back to the payer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Timestamp>)]
    capture_before: Option<u64>,
    /// When a held payment was captured.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Timestamp>)]
    captured_at: Option<u64>,
    /// When a held payment was canceled or expired.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<openapi::Timestamp>)]
    canceled_at: Option<u64>,
    /// Why a held payment was canceled: `requested` (by its merchant or the operator) or `expired` (not captured in time).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = openapi::cancellation_reason)]
    cancellation_reason: Option<&'static str>,
}

pub fn payment_view(payment: &Payment) -> PaymentView<'_> {
    let hold = payment.hold.as_deref().copied();
    let status = match hold.map(|hold| hold.status) {
        None | Some(HoldStatus::Captured) => "succeeded",
        Some(HoldStatus::Held) => "requires_capture",
        Some(HoldStatus::Canceled | HoldStatus::Expired) => "canceled",
    };
    let resolved = |wanted: &[HoldStatus]| {
        hold.filter(|hold| wanted.contains(&hold.status))
            .and_then(|hold| hold.resolved_at)
            .map(seconds)
    };
    PaymentView {
        capture_method: if hold.is_some() {
            "manual"
        } else {
            "automatic"
        },
        amount_authorized: hold.map(|hold| hold.amount_authorized.to_string()),
        capture_before: hold
            .filter(|hold| hold.status == HoldStatus::Held)
            .map(|hold| seconds(hold.expires_at)),
        captured_at: resolved(&[HoldStatus::Captured]),
        canceled_at: resolved(&[HoldStatus::Canceled, HoldStatus::Expired]),
        cancellation_reason: match hold.map(|hold| hold.status) {
            Some(HoldStatus::Canceled) => Some("requested"),
            Some(HoldStatus::Expired) => Some("expired"),
            _ => None,
        },
        id: payment.id.to_string(),
        object: "payment",
        status,
        payer: payment.payer.to_string(),
        merchant: payment.merchant.to_string(),
        amount: payment.amount.to_string(),
        currency: payment.currency.as_str(),
        fee: payment.fee.to_string(),
        net: payment.net().to_string(),
        amount_refunded: payment.amount_refunded.to_string(),
        refunded: payment.amount_refunded == payment.amount,
        description: &payment.description,
        reference: &payment.reference,
        created_at: seconds(payment.created_at),
    }
}

pub fn payment(payment: &Payment) -> Value {
    to_value(payment_view(payment))
}

#[derive(Serialize, ToSchema)]
#[schema(as = Refund)]
pub struct RefundView<'a> {
    #[schema(value_type = openapi::RefundId)]
    id: String,
    #[schema(schema_with = openapi::object_refund)]
    object: &'static str,
    #[schema(schema_with = openapi::status_succeeded)]
    status: &'static str,
    #[schema(value_type = openapi::PaymentId)]
    payment: String,
    /// What went back to the payer.
    #[schema(value_type = openapi::AmountOut)]
    amount: String,
    #[schema(value_type = openapi::Currency)]
    currency: &'a str,
    /// The part of `amount` taken back from the platform's fee, in proportion to the payment's fee; the rest came from the merchant.
    #[schema(value_type = openapi::AmountOut)]
    fee_refunded: String,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
}

pub fn refund(refund: &Refund) -> Value {
    to_value(RefundView {
        id: refund.id.to_string(),
        object: "refund",
        status: "succeeded",
        payment: refund.payment.to_string(),
        amount: refund.amount.to_string(),
        currency: refund.currency.as_str(),
        fee_refunded: refund.fee_refunded.to_string(),
        created_at: seconds(refund.created_at),
    })
}

#[derive(Serialize, ToSchema)]
#[schema(as = Balances)]
pub struct BalancesView<'a> {
    /// One balance per currency, in alphabetical order of currency.
    balances: Vec<BalanceView<'a>>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Balance)]
pub struct BalanceView<'a> {
    #[schema(value_type = openapi::Currency)]
    currency: &'a str,
    #[schema(value_type = openapi::SignedAmountOut)]
    available: String,
}

pub fn balances(balances: &[(Currency, i128)]) -> Value {
    to_value(BalancesView {
        balances: balances
            .iter()
            .map(|(currency, available)| BalanceView {
                currency: currency.as_str(),
                available: signed(*available),
            })
            .collect(),
    })
}

/// A derived balance as a decimal string; negative only for accounts without a limit.
pub fn signed(micros: i128) -> String {
    let magnitude = Amount::from_micros(u64::try_from(micros.unsigned_abs()).unwrap_or(u64::MAX));
    if micros < 0 {
        format!("-{magnitude}")
    } else {
        magnitude.to_string()
    }
}

#[derive(Serialize, ToSchema)]
#[schema(as = LedgerEntry, description = "One movement of a payer's wallet.")]
pub struct LedgerEntryView<'a> {
    #[schema(schema_with = openapi::ledger_entry_id)]
    id: String,
    #[schema(schema_with = openapi::object_ledger_entry)]
    object: &'static str,
    #[serde(rename = "type")]
    #[schema(schema_with = openapi::entry_type)]
    kind: &'static str,
    #[schema(schema_with = openapi::entry_direction)]
    direction: &'static str,
    #[schema(value_type = openapi::AmountOut)]
    amount: String,
    #[schema(value_type = openapi::Currency)]
    currency: &'a str,
    /// The wallet's balance in `currency` right after this entry.
    #[schema(value_type = openapi::AmountOut)]
    running_balance: String,
    #[schema(value_type = openapi::Timestamp)]
    created_at: u64,
}

fn entry_view(entry: &Entry) -> LedgerEntryView<'_> {
    let (id, kind) = match entry.object {
        EntryObject::Topup(id) => (id.to_string(), "topup"),
        EntryObject::Payment(id) => (id.to_string(), "payment"),
        EntryObject::Refund(id) => (id.to_string(), "refund"),
    };
    LedgerEntryView {
        id,
        object: "ledger_entry",
        kind,
        direction: if entry.credit { "credit" } else { "debit" },
        amount: entry.amount.to_string(),
        currency: entry.currency.as_str(),
        running_balance: entry.balance_after.to_string(),
        created_at: seconds(entry.created_at),
    }
}

// A page of payments.
#[derive(Serialize, ToSchema)]
pub struct PaymentList<'a> {
    #[schema(schema_with = openapi::object_list)]
    object: &'static str,
    /// Newest first.
    data: Vec<PaymentView<'a>>,
    /// Whether older payments follow this page.
    has_more: bool,
}

pub fn payment_list(payments: &[Payment], has_more: bool) -> Value {
    to_value(PaymentList {
        object: "list",
        data: payments.iter().map(payment_view).collect(),
        has_more,
    })
}

// A page of a payer's statement.
#[derive(Serialize, ToSchema)]
pub struct LedgerEntryList<'a> {
    #[schema(schema_with = openapi::object_list)]
    object: &'static str,
    /// Newest first.
    data: Vec<LedgerEntryView<'a>>,
    /// Whether older entries follow this page.
    has_more: bool,
}

pub fn entry_list(entries: &[Entry], has_more: bool) -> Value {
    to_value(LedgerEntryList {
        object: "list",
        data: entries.iter().map(entry_view).collect(),
        has_more,
    })
}

/// A time as RFC 3339, in UTC, to the second.
pub fn rfc3339(time: Timestamp) -> String {
    let system = std::time::UNIX_EPOCH + std::time::Duration::from_micros(time.0);
    humantime::format_rfc3339_seconds(system).to_string()
}

#[derive(Serialize, ToSchema)]
#[schema(as = TestClock, description = "The test clock's time.")]
pub struct TestClockView {
    #[schema(schema_with = openapi::object_test_clock)]
    object: &'static str,
    #[schema(schema_with = openapi::now_rfc3339)]
    now: String,
    #[schema(schema_with = openapi::now_unix)]
    now_unix: u64,
}

pub fn test_clock(now: Timestamp) -> Value {
    to_value(TestClockView {
        object: "test_clock",
        now: rfc3339(now),
        now_unix: seconds(now),
    })
}
