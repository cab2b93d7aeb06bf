//! The stored form of an [`Outcome`]: an idempotency key's first answer, read back on retry
//! long after it was written, so it must come back exactly and refuse anything else.

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::codec::{self, DecodeError};
use farthing_payments::*;
use proptest::prelude::*;

const CASES: u32 = 256;

/// Every rejection, each with the tag it is stored under. The match has no catch-all: a new
/// variant does not compile until it is given a tag here, and the pinned tags catch any
/// renumbering of those already stored.
fn pinned_tag(rejection: Rejection) -> u8 {
    match rejection {
        Rejection::PayerNotFound => 1,
        Rejection::MerchantNotFound => 2,
        Rejection::PaymentNotFound => 3,
        Rejection::InsufficientFunds => 4,
        Rejection::FundingDeclined => 5,
        Rejection::RefundExceedsPayment => 6,
        Rejection::MerchantBalanceInsufficient => 7,
        Rejection::AmountTooLarge => 8,
        Rejection::AmountNotPositive => 9,
        Rejection::IdempotencyKeyReused => 10,
        Rejection::IdCollision => 11,
        Rejection::ImportDoesNotFit => 12,
        Rejection::Room(RoomRejection::Holds(rejection)) => match rejection {
            HoldRejection::PaymentNotHeld => 13,
            HoldRejection::HoldExpired => 14,
            HoldRejection::CaptureExceedsAuthorization => 15,
            HoldRejection::PaymentNotCaptured => 16,
        },
    }
}

/// Every variant of [`Rejection`], once. The test that every decodable tag is listed here
/// catches a variant the codec knows but this list forgot.
const EVERY_REJECTION: [Rejection; 16] = [
    Rejection::PayerNotFound,
    Rejection::MerchantNotFound,
    Rejection::PaymentNotFound,
    Rejection::InsufficientFunds,
    Rejection::FundingDeclined,
    Rejection::RefundExceedsPayment,
    Rejection::MerchantBalanceInsufficient,
    Rejection::AmountTooLarge,
    Rejection::AmountNotPositive,
    Rejection::IdempotencyKeyReused,
    Rejection::IdCollision,
    Rejection::ImportDoesNotFit,
    Rejection::Room(RoomRejection::Holds(HoldRejection::PaymentNotHeld)),
    Rejection::Room(RoomRejection::Holds(HoldRejection::HoldExpired)),
    Rejection::Room(RoomRejection::Holds(
        HoldRejection::CaptureExceedsAuthorization,
    )),
    Rejection::Room(RoomRejection::Holds(HoldRejection::PaymentNotCaptured)),
];

fn encoded(outcome: &Outcome) -> Vec<u8> {
    let mut bytes = Vec::new();
    codec::encode_outcome(outcome, &mut bytes);
    bytes
}

// =============================================================================================
// Strategies
// =============================================================================================

const CODES: [&str; 8] = ["USD", "EUR", "JPY", "KES", "GBP", "ZAR", "NGN", "BRL"];

fn any_currency() -> impl Strategy<Value = Currency> {
    prop::sample::select(CODES.to_vec()).prop_map(|code| Currency::parse(code).unwrap())
}

/// Any Unicode text: control characters, NUL, emoji, combining marks.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..12).prop_map(|c| c.into_iter().collect()),
        prop::sample::select(vec![
            "",
            "café",
            "日本語の説明",
            "🪙💸",
            "a\u{0}b",
            "e\u{301}",
        ])
        .prop_map(str::to_string),
    ]
}

fn any_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(u64::MAX), any::<u64>()]
}

fn any_u128() -> impl Strategy<Value = u128> {
    prop_oneof![Just(0), Just(u128::MAX), any::<u128>()]
}

fn any_amount() -> impl Strategy<Value = Amount> {
    any_u64().prop_map(Amount::from_micros)
}

fn any_timestamp() -> impl Strategy<Value = Timestamp> {
    any_u64().prop_map(Timestamp)
}

fn any_rejection() -> impl Strategy<Value = Rejection> {
    prop::sample::select(EVERY_REJECTION.to_vec())
}

fn any_batch_item() -> impl Strategy<Value = BatchItemOutcome> {
    prop_oneof![
        any_u128().prop_map(|id| BatchItemOutcome::Succeeded(PaymentId::from_u128(id))),
        any_rejection().prop_map(BatchItemOutcome::Failed),
    ]
}

fn any_merchant() -> impl Strategy<Value = Merchant> {
    (
        any_u128(),
        any_text(),
        any::<u32>(),
        any_amount(),
        any_timestamp(),
    )
        .prop_map(|(id, name, bps, fixed, created_at)| Merchant {
            id: MerchantId::from_u128(id),
            name,
            fee: FeeSchedule { bps, fixed },
            created_at,
        })
}

fn any_payer() -> impl Strategy<Value = Payer> {
    (any_u128(), any_text(), any_timestamp()).prop_map(|(id, name, created_at)| Payer {
        id: PayerId::from_u128(id),
        name,
        created_at,
    })
}

fn any_topup() -> impl Strategy<Value = Topup> {
    (
        (any_u128(), any_u128()),
        any_amount(),
        any_currency(),
        any::<bool>(),
        any_timestamp(),
    )
        .prop_map(
            |((id, payer), amount, currency, decline, created_at)| Topup {
                id: TopupId::from_u128(id),
                payer: PayerId::from_u128(payer),
                amount,
                currency,
                source: if decline {
                    FundingSource::SandboxDecline
                } else {
                    FundingSource::Sandbox
                },
                created_at,
            },
        )
}

fn any_payment() -> impl Strategy<Value = Payment> {
    (
        (any_u128(), any_u128(), any_u128()),
        (any_amount(), any_currency(), any_amount()),
        prop::option::of(any_text()),
        prop::option::of(any_text()),
        any_timestamp(),
        (any_amount(), any_amount()),
    )
        .prop_map(
            |(
                (id, payer, merchant),
                (amount, currency, fee),
                description,
                reference,
                created_at,
                (amount_refunded, fee_refunded),
            )| Payment {
                id: PaymentId::from_u128(id),
                payer: PayerId::from_u128(payer),
                merchant: MerchantId::from_u128(merchant),
                amount,
                currency,
                fee,
                description,
                reference,
                created_at,
                amount_refunded,
                fee_refunded,
                hold: None,
            },
        )
}

fn any_hold() -> impl Strategy<Value = Hold> {
    (
        prop::sample::select(vec![
            HoldStatus::Held,
            HoldStatus::Captured,
            HoldStatus::Canceled,
            HoldStatus::Expired,
        ]),
        (any_amount(), any_amount(), any_amount()),
        any_timestamp(),
        prop::option::of(any_timestamp()),
        (any_u128(), any_u128(), any_u128()),
    )
        .prop_map(
            |(
                status,
                (amount_authorized, amount_captured, fee_captured),
                expires_at,
                resolved_at,
                (t0, t1, t2),
            )| Hold {
                status,
                amount_authorized,
                amount_captured,
                fee_captured,
                expires_at,
                resolved_at,
                transfers: [TransferId(t0), TransferId(t1), TransferId(t2)],
            },
        )
}

/// A payment as a hold's outcome carries it: with its hold.
fn any_held_payment() -> impl Strategy<Value = Payment> {
    (any_payment(), any_hold()).prop_map(|(mut payment, hold)| {
        payment.hold = Some(Box::new(hold));
        payment
    })
}

fn any_refund() -> impl Strategy<Value = Refund> {
    (
        (any_u128(), any_u128(), any_u128(), any_u128()),
        (any_amount(), any_currency(), any_amount()),
        any_timestamp(),
    )
        .prop_map(
            |((id, payment, payer, merchant), (amount, currency, fee_refunded), created_at)| {
                Refund {
                    id: RefundId::from_u128(id),
                    payment: PaymentId::from_u128(payment),
                    payer: PayerId::from_u128(payer),
                    merchant: MerchantId::from_u128(merchant),
                    amount,
                    currency,
                    fee_refunded,
                    created_at,
                }
            },
        )
}

fn any_outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::OperatorKeySet),
        any_merchant().prop_map(Outcome::MerchantCreated),
        any_payer().prop_map(Outcome::PayerCreated),
        any_topup().prop_map(Outcome::ToppedUp),
        any_payment().prop_map(Outcome::Paid),
        prop::collection::vec(any_batch_item(), 0..8).prop_map(Outcome::PaidBatch),
        any_refund().prop_map(Outcome::Refunded),
        any_held_payment().prop_map(|payment| Outcome::from(HoldOutcome::Changed(payment))),
        prop_oneof![Just(0), Just(usize::MAX), any::<usize>()]
            .prop_map(|count| Outcome::from(HoldOutcome::Expired { count })),
        Just(Outcome::Pruned),
        prop_oneof![Just(0), Just(usize::MAX), any::<usize>()]
            .prop_map(|count| Outcome::Imported { count }),
        any_rejection().prop_map(Outcome::Rejected),
    ]
}

// =============================================================================================
// Properties
// =============================================================================================

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn every_outcome_decodes_to_itself_after_encoding(outcome in any_outcome()) {
        prop_assert_eq!(codec::decode_outcome(&encoded(&outcome)), Ok(outcome));
    }

    #[test]
    fn an_outcome_cut_short_at_any_length_does_not_decode(outcome in any_outcome()) {
        let bytes = encoded(&outcome);
        for len in 0..bytes.len() {
            prop_assert!(
                codec::decode_outcome(&bytes[..len]).is_err(),
                "{} of {} bytes decoded",
                len,
                bytes.len()
            );
        }
    }

    #[test]
    fn an_outcome_with_bytes_after_it_does_not_decode(
        outcome in any_outcome(),
        extra in prop::collection::vec(any::<u8>(), 1..4),
    ) {
        let mut bytes = encoded(&outcome);
        bytes.extend(extra);
        prop_assert_eq!(codec::decode_outcome(&bytes), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn an_outcome_version_byte_the_codec_does_not_know_is_refused(
        outcome in any_outcome(),
        version in any::<u8>(),
    ) {
        let mut bytes = encoded(&outcome);
        prop_assume!(version != bytes[0]);
        bytes[0] = version;
        prop_assert_eq!(
            codec::decode_outcome(&bytes),
            Err(DecodeError::UnknownVersion(version))
        );
    }
}

// =============================================================================================
// Tags
// =============================================================================================

#[test]
fn every_rejection_is_stored_under_its_own_pinned_tag() {
    let mut seen = std::collections::HashSet::new();
    for rejection in EVERY_REJECTION {
        let tag = pinned_tag(rejection);
        assert!(seen.insert(tag), "{rejection:?} shares tag {tag}");
        let outcome = Outcome::Rejected(rejection);
        let bytes = encoded(&outcome);
        assert_eq!(
            bytes[2..],
            [tag],
            "{rejection:?} is stored under another tag"
        );
        assert_eq!(codec::decode_outcome(&bytes), Ok(outcome));

        let batch = Outcome::PaidBatch(vec![BatchItemOutcome::Failed(rejection)]);
        let bytes = encoded(&batch);
        assert_eq!(bytes.last(), Some(&tag), "{rejection:?} in a batch");
        assert_eq!(codec::decode_outcome(&bytes), Ok(batch));
    }
    assert_eq!(seen.len(), EVERY_REJECTION.len());
}

#[test]
fn a_rejection_tag_outside_the_list_is_refused() {
    let listed: Vec<u8> = EVERY_REJECTION.into_iter().map(pinned_tag).collect();
    let template = encoded(&Outcome::Rejected(Rejection::PayerNotFound));
    for tag in 0..=u8::MAX {
        let mut bytes = template.clone();
        bytes[2] = tag;
        let decoded = codec::decode_outcome(&bytes);
        if listed.contains(&tag) {
            assert!(decoded.is_ok(), "listed tag {tag} does not decode");
        } else {
            assert_eq!(
                decoded,
                Err(DecodeError::UnknownTag(tag)),
                "tag {tag} decodes but is not in EVERY_REJECTION"
            );
        }
    }
}

#[test]
fn an_outcome_tag_the_codec_does_not_know_is_refused() {
    let version = encoded(&Outcome::OperatorKeySet)[0];
    for tag in [0, 13, u8::MAX] {
        assert_eq!(
            codec::decode_outcome(&[version, tag]),
            Err(DecodeError::UnknownTag(tag))
        );
    }
}

#[test]
fn a_batch_claiming_more_items_than_its_bytes_hold_is_refused() {
    let mut bytes = encoded(&Outcome::PaidBatch(Vec::new()));
    let count = bytes.len() - 4;
    bytes[count..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        codec::decode_outcome(&bytes),
        Err(DecodeError::UnexpectedEnd)
    );
}
