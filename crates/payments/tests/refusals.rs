//! A refusal that moves no money changes nothing: the state after it exports exactly as
//! before, and `State::refusal` tells the same refusal beforehand without applying anything.

use farthing_ledger::{Amount, MICROS_PER_UNIT, TransferId};
use farthing_payments::*;
use farthing_testing::{currency, key_hash, record_at};

fn shop_with_a_funded_payer(units: u64) -> (State, PayerId, MerchantId) {
    let mut state = State::new();
    let (payer, merchant) = (PayerId::from_u128(1), MerchantId::from_u128(2));
    let commands = [
        Command::CreatePayer {
            id: payer,
            name: "Ada".into(),
            key_hash: key_hash(1),
        },
        Command::CreateMerchant {
            id: merchant,
            name: "Shop".into(),
            key_hash: key_hash(2),
            fee: FeeSchedule {
                bps: 100,
                fixed: Amount::ZERO,
            },
        },
        Command::Topup {
            id: TopupId::from_u128(3),
            payer,
            amount: Amount::from_micros(units * MICROS_PER_UNIT),
            currency: currency("USD"),
            source: FundingSource::Sandbox,
            transfer_id: TransferId(3),
        },
    ];
    for (at, command) in commands.into_iter().enumerate() {
        let outcome = state.apply(&record_at(at as u64, command));
        assert!(!matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
    }
    (state, payer, merchant)
}

fn pay(payer: PayerId, merchant: MerchantId, micros: u64, code: &str, id: u128) -> Command {
    Command::Pay(PayCommand {
        id: PaymentId::from_u128(id),
        payer,
        merchant,
        amount: Amount::from_micros(micros),
        currency: currency(code),
        description: None,
        reference: None,
        transfer_ids: [TransferId(id * 10), TransferId(id * 10 + 1)],
    })
}

#[test]
fn a_payment_the_wallet_cannot_cover_leaves_no_trace() {
    let (mut state, payer, merchant) = shop_with_a_funded_payer(1);
    let before: Vec<Imported> = state.export().collect();
    let transfers_before = state.ledger_transfer_count();
    for (id, command) in [
        (10, pay(payer, merchant, 2 * MICROS_PER_UNIT, "USD", 10)),
        // No wallet in EUR, and the merchant has no EUR account yet: none is made.
        (11, pay(payer, merchant, 1, "EUR", 11)),
    ] {
        assert_eq!(
            state.refusal(&command),
            Some(Rejection::InsufficientFunds),
            "payment {id}"
        );
        assert_eq!(
            state.apply(&record_at(100 + id, command)),
            Outcome::Rejected(Rejection::InsufficientFunds)
        );
    }
    let after: Vec<Imported> = state.export().collect();
    assert_eq!(after, before);
    assert_eq!(state.ledger_transfer_count(), transfers_before);
    // What the wallet covers is not refused beforehand, and is paid.
    let affordable = pay(payer, merchant, MICROS_PER_UNIT, "USD", 12);
    assert_eq!(state.refusal(&affordable), None);
    assert!(matches!(
        state.apply(&record_at(200, affordable)),
        Outcome::Paid(_)
    ));
}

#[test]
fn refusals_are_told_beforehand_for_unknown_parties_refunds_and_declined_top_ups() {
    let (state, payer, merchant) = shop_with_a_funded_payer(1);
    assert_eq!(
        state.refusal(&pay(payer, MerchantId::from_u128(99), 1, "USD", 20)),
        Some(Rejection::MerchantNotFound)
    );
    assert_eq!(
        state.refusal(&pay(PayerId::from_u128(98), merchant, 1, "USD", 21)),
        Some(Rejection::PayerNotFound)
    );
    let refund = Command::Refund {
        id: RefundId::from_u128(22),
        payment: PaymentId::from_u128(97),
        amount: None,
        caller: Principal::Merchant(merchant),
        transfer_ids: [TransferId(220), TransferId(221)],
    };
    assert_eq!(state.refusal(&refund), Some(Rejection::PaymentNotFound));
    let declined = Command::Topup {
        id: TopupId::from_u128(23),
        payer,
        amount: Amount::from_micros(1),
        currency: currency("USD"),
        source: FundingSource::SandboxDecline,
        transfer_id: TransferId(23),
    };
    assert_eq!(state.refusal(&declined), Some(Rejection::FundingDeclined));
}

#[test]
fn a_hold_whose_settling_id_was_taken_refuses_capture_and_cancel_unchanged_and_still_expires() {
    let (mut state, payer, merchant) = shop_with_a_funded_payer(1);
    let usd = currency("USD");
    let held = PaymentId::from_u128(30);
    let authorize = Command::from(HoldCommand::Authorize {
        pay: PayCommand {
            id: held,
            payer,
            merchant,
            amount: Amount::from_micros(1_000),
            currency: usd,
            description: None,
            reference: None,
            transfer_ids: [TransferId(300), TransferId(302)],
        },
        expires_at: farthing_ledger::Timestamp(farthing_testing::EPOCH + 50),
        settle_id: TransferId(301),
    });
    assert!(matches!(
        state.apply(&record_at(10, authorize)),
        Outcome::Room(RoomOutcome::Holds(HoldOutcome::Changed(_)))
    ));
    // Ids are chosen at random and never meet; here two top-ups take the two the hold keeps
    // for settling.
    for (n, id) in [(31, 301), (32, 302)] {
        let taking = Command::Topup {
            id: TopupId::from_u128(n),
            payer,
            amount: Amount::from_micros(1_000),
            currency: usd,
            source: FundingSource::Sandbox,
            transfer_id: TransferId(id),
        };
        assert!(matches!(
            state.apply(&record_at(11, taking)),
            Outcome::ToppedUp(_)
        ));
    }
    let before: Vec<Imported> = state.export().collect();
    let transfers_before = state.ledger_transfer_count();
    for command in [
        Command::from(HoldCommand::Capture {
            payment: held,
            amount: None,
            caller: Principal::Merchant(merchant),
        }),
        Command::from(HoldCommand::Capture {
            payment: held,
            amount: Some(Amount::from_micros(10)),
            caller: Principal::Operator,
        }),
        Command::from(HoldCommand::Cancel {
            payment: held,
            caller: Principal::Operator,
        }),
    ] {
        assert_eq!(
            state.apply(&record_at(20, command)),
            Outcome::Rejected(Rejection::IdCollision)
        );
    }
    assert_eq!(state.export().collect::<Vec<_>>(), before);
    assert_eq!(state.ledger_transfer_count(), transfers_before);
    // Expiry needs no id of its own: the money goes back to the wallet.
    let balance = |state: &State| state.payer_balances(payer).unwrap().expect("a payer");
    let held_back = balance(&state);
    assert_eq!(
        state.apply(&record_at(
            60,
            Command::from(HoldCommand::Expire {
                at: farthing_ledger::Timestamp(farthing_testing::EPOCH + 60)
            })
        )),
        Outcome::from(HoldOutcome::Expired { count: 1 })
    );
    let payment = state.payment(held).unwrap().expect("held");
    assert_eq!(
        payment.hold.map(|hold| hold.status),
        Some(HoldStatus::Expired)
    );
    assert_eq!(
        balance(&state),
        vec![(usd, held_back[0].1 + 1_000)],
        "the hold's amount is available again"
    );
    assert_eq!(state.live_holds(), 0);
}
