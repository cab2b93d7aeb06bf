//! Inputs the HTTP edge never sends but the state must still answer without panicking: the
//! state is applied by the single writer, and a panic there stops the whole server.

use farthing_ledger::{Amount, Currency, Timestamp, TransferId};
use farthing_payments::*;

fn record(command: Command) -> Record {
    Record {
        now: Timestamp(1_000_000),
        idempotency: None,
        command,
    }
}

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

/// A payer with `funds` USD and a merchant charging 10%.
fn setup(funds: u64) -> (State, PayerId, MerchantId) {
    let mut state = State::new();
    let payer = PayerId::from_u128(1);
    let merchant = MerchantId::from_u128(2);
    state.apply(&record(Command::CreatePayer {
        id: payer,
        name: "payer".into(),
        key_hash: KeyHash([1; 32]),
    }));
    state.apply(&record(Command::CreateMerchant {
        id: merchant,
        name: "merchant".into(),
        key_hash: KeyHash([2; 32]),
        fee: FeeSchedule {
            bps: 1_000,
            fixed: Amount::ZERO,
        },
    }));
    let topped = state.apply(&record(Command::Topup {
        id: TopupId::from_u128(3),
        payer,
        amount: Amount::from_micros(funds),
        currency: usd(),
        source: FundingSource::Sandbox,
        transfer_id: TransferId(4),
    }));
    assert!(matches!(topped, Outcome::ToppedUp(_)));
    (state, payer, merchant)
}

fn pay(payer: PayerId, merchant: MerchantId, micros: u64, ids: [u128; 3]) -> Command {
    Command::Pay(PayCommand {
        id: PaymentId::from_u128(ids[0]),
        payer,
        merchant,
        amount: Amount::from_micros(micros),
        currency: usd(),
        description: None,
        reference: None,
        transfer_ids: [TransferId(ids[1]), TransferId(ids[2])],
    })
}

fn balance(state: &State, payer: PayerId) -> i128 {
    state.payer_balances(payer).unwrap().unwrap()[0].1
}

#[test]
fn a_zero_top_up_or_payment_is_refused_and_moves_nothing() {
    let (mut state, payer, merchant) = setup(1_000);
    let topup = state.apply(&record(Command::Topup {
        id: TopupId::from_u128(10),
        payer,
        amount: Amount::ZERO,
        currency: usd(),
        source: FundingSource::Sandbox,
        transfer_id: TransferId(11),
    }));
    assert_eq!(topup, Outcome::Rejected(Rejection::AmountNotPositive));
    let paid = state.apply(&record(pay(payer, merchant, 0, [12, 13, 14])));
    assert_eq!(paid, Outcome::Rejected(Rejection::AmountNotPositive));
    assert_eq!(balance(&state, payer), 1_000);
    assert_eq!(state.payment_count(), 0);
}

#[test]
fn transfer_id_zero_is_refused_as_a_collision_not_a_crash() {
    let (mut state, payer, merchant) = setup(1_000);
    let paid = state.apply(&record(pay(payer, merchant, 100, [20, 0, 0])));
    assert_eq!(paid, Outcome::Rejected(Rejection::IdCollision));
    assert_eq!(balance(&state, payer), 1_000);
}

#[test]
fn the_same_failed_payment_record_applied_twice_is_refused_both_times() {
    // 1,050 from a wallet of 1,000 at a 10% fee: the merchant's 945 fits, the fee does not.
    let (mut state, payer, merchant) = setup(1_000);
    let command = pay(payer, merchant, 1_050, [30, 31, 32]);
    let first = state.apply(&record(command.clone()));
    assert_eq!(first, Outcome::Rejected(Rejection::InsufficientFunds));
    let again = state.apply(&record(command));
    assert!(
        matches!(again, Outcome::Rejected(_)),
        "a replayed failure stays a failure: {again:?}"
    );
    assert_eq!(balance(&state, payer), 1_000);
    for totals in state.currency_totals() {
        assert_eq!((totals.posted_net, totals.pending_net), (0, 0));
    }
}

#[test]
fn account_ids_depend_on_owner_and_currency_not_on_the_order_accounts_were_opened() {
    let eur = Currency::parse("EUR").unwrap();
    let topup = |payer: PayerId, currency: Currency, id: u128| {
        record(Command::Topup {
            id: TopupId::from_u128(id),
            payer,
            amount: Amount::from_micros(500),
            currency,
            source: FundingSource::Sandbox,
            transfer_id: TransferId(id + 1),
        })
    };
    let create = |id: u128, key: u8| {
        record(Command::CreatePayer {
            id: PayerId::from_u128(id),
            name: format!("payer {id}"),
            key_hash: KeyHash([key; 32]),
        })
    };
    let (a, b) = (PayerId::from_u128(100), PayerId::from_u128(200));
    let mut first = State::new();
    for r in [
        create(100, 1),
        create(200, 2),
        topup(a, usd(), 10),
        topup(b, eur, 20),
        topup(a, eur, 30),
    ] {
        first.apply(&r);
    }
    let mut second = State::new();
    for r in [
        create(200, 2),
        create(100, 1),
        topup(a, eur, 30),
        topup(b, eur, 20),
        topup(a, usd(), 10),
    ] {
        second.apply(&r);
    }
    let ids = |state: &State| {
        let mut ids: Vec<(u64, Currency, i128)> = state
            .ledger_accounts()
            .map(|account| (account.id.0, account.currency, account.posted_balance()))
            .collect();
        ids.sort();
        ids
    };
    // Two wallets for one payer, one for the other, and one funding account per currency.
    assert_eq!(ids(&first).len(), 5);
    assert_eq!(ids(&first), ids(&second));
}

#[test]
fn a_payment_naming_a_recorded_transfer_id_or_one_id_twice_is_refused_and_moves_nothing() {
    let (mut state, payer, merchant) = setup(1_000);
    // The top-up's transfer (id 4) is recorded: the ledger would answer "already done".
    let reused = state.apply(&record(pay(payer, merchant, 600, [40, 41, 4])));
    assert_eq!(reused, Outcome::Rejected(Rejection::IdCollision));
    // A payment's legs leave no records, so the ledger could not tell its two legs apart.
    let twice = state.apply(&record(pay(payer, merchant, 600, [43, 44, 44])));
    assert_eq!(twice, Outcome::Rejected(Rejection::IdCollision));
    assert_eq!(balance(&state, payer), 1_000);
    assert_eq!(state.payment_count(), 0);
}

#[test]
fn a_payments_legs_leave_no_transfer_records_and_its_ids_are_not_held_against_a_later_one() {
    let (mut state, payer, merchant) = setup(1_000);
    let records_before = state.ledger_transfer_count();
    let first = state.apply(&record(pay(payer, merchant, 600, [40, 41, 42])));
    assert!(matches!(first, Outcome::Paid(_)), "{first:?}");
    assert_eq!(state.ledger_transfer_count(), records_before);
    // A new payment (its own id) that names the same transfer ids is a payment of its own:
    // it moves money, or is refused for want of it, like any other.
    let second = state.apply(&record(pay(payer, merchant, 300, [43, 41, 42])));
    assert!(matches!(second, Outcome::Paid(_)), "{second:?}");
    let third = state.apply(&record(pay(payer, merchant, 300, [45, 41, 42])));
    assert_eq!(third, Outcome::Rejected(Rejection::InsufficientFunds));
    assert_eq!(balance(&state, payer), 100);
    assert_eq!(state.payment_count(), 2);
}

#[test]
fn an_operator_key_cannot_take_over_a_merchants_key() {
    let (mut state, _, merchant) = setup(1_000);
    let merchant_key = KeyHash([2; 32]);
    assert_eq!(
        state.principal(&merchant_key).unwrap(),
        Some(Principal::Merchant(merchant))
    );
    let outcome = state.apply(&record(Command::SetOperatorKey {
        key_hash: merchant_key,
    }));
    assert_eq!(outcome, Outcome::Rejected(Rejection::IdCollision));
    assert_eq!(
        state.principal(&merchant_key).unwrap(),
        Some(Principal::Merchant(merchant))
    );
    assert!(!state.has_operator_key());
}
