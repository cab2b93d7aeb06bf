//! JSON views of Farthing's objects. Amounts are decimal strings; times are Unix seconds.

use farthing_ledger::{Amount, Currency, Timestamp};
use farthing_payments::{Entry, EntryObject, Merchant, Payer, Payment, Refund, Topup};
use serde::Serialize;
use serde_json::{Value, json};

pub fn seconds(time: Timestamp) -> u64 {
    time.0 / 1_000_000
}

pub fn merchant(merchant: &Merchant, api_key: Option<&str>) -> Value {
    let mut value = json!({
        "id": merchant.id.to_string(),
        "object": "merchant",
        "name": merchant.name,
        "fee_bps": merchant.fee.bps,
        "fee_fixed": merchant.fee.fixed.to_string(),
        "created_at": seconds(merchant.created_at),
    });
    if let Some(key) = api_key {
        value["api_key"] = json!(key);
    }
    value
}

pub fn payer(payer: &Payer, api_key: Option<&str>) -> Value {
    let mut value = json!({
        "id": payer.id.to_string(),
        "object": "payer",
        "name": payer.name,
        "created_at": seconds(payer.created_at),
    });
    if let Some(key) = api_key {
        value["api_key"] = json!(key);
    }
    value
}

pub fn topup(topup: &Topup) -> Value {
    json!({
        "id": topup.id.to_string(),
        "object": "topup",
        "status": "succeeded",
        "payer": topup.payer.to_string(),
        "amount": topup.amount.to_string(),
        "currency": topup.currency.as_str(),
        "source": match topup.source {
            farthing_payments::FundingSource::Sandbox => "sandbox",
            farthing_payments::FundingSource::SandboxDecline => "sandbox_decline",
        },
        "created_at": seconds(topup.created_at),
    })
}

/// The payment view, serialized directly: the hottest response of the API, so it skips the
/// intermediate `Value` tree.
#[derive(Serialize)]
pub struct PaymentView<'a> {
    id: String,
    object: &'static str,
    status: &'static str,
    payer: String,
    merchant: String,
    amount: String,
    currency: &'a str,
    fee: String,
    net: String,
    amount_refunded: String,
    /// Whether the whole amount has been refunded, as Stripe's charges say.
    refunded: bool,
    description: &'a Option<String>,
    reference: &'a Option<String>,
    created_at: u64,
}

pub fn payment_view(payment: &Payment) -> PaymentView<'_> {
    PaymentView {
        id: payment.id.to_string(),
        object: "payment",
        status: "succeeded",
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
    serde_json::to_value(payment_view(payment)).expect("a payment view serializes")
}

pub fn refund(refund: &Refund) -> Value {
    json!({
        "id": refund.id.to_string(),
        "object": "refund",
        "status": "succeeded",
        "payment": refund.payment.to_string(),
        "amount": refund.amount.to_string(),
        "currency": refund.currency.as_str(),
        "fee_refunded": refund.fee_refunded.to_string(),
        "created_at": seconds(refund.created_at),
    })
}

pub fn balances(balances: &[(Currency, i128)]) -> Value {
    json!({
        "balances": balances
            .iter()
            .map(|(currency, available)| json!({
                "currency": currency.as_str(),
                "available": signed(*available),
            }))
            .collect::<Vec<_>>(),
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

pub fn entry(entry: &Entry) -> Value {
    let (id, kind) = match entry.object {
        EntryObject::Topup(id) => (id.to_string(), "topup"),
        EntryObject::Payment(id) => (id.to_string(), "payment"),
        EntryObject::Refund(id) => (id.to_string(), "refund"),
    };
    json!({
        "id": id,
        "object": "ledger_entry",
        "type": kind,
        "direction": if entry.credit { "credit" } else { "debit" },
        "amount": entry.amount.to_string(),
        "currency": entry.currency.as_str(),
        "running_balance": entry.balance_after.to_string(),
        "created_at": seconds(entry.created_at),
    })
}

pub fn list(items: Vec<Value>, has_more: bool) -> Value {
    json!({ "object": "list", "data": items, "has_more": has_more })
}

/// A time as RFC 3339, in UTC, to the second.
pub fn rfc3339(time: Timestamp) -> String {
    let system = std::time::UNIX_EPOCH + std::time::Duration::from_micros(time.0);
    humantime::format_rfc3339_seconds(system).to_string()
}

pub fn test_clock(now: Timestamp) -> Value {
    json!({
        "object": "test_clock",
        "now": rfc3339(now),
        "now_unix": seconds(now),
    })
}
