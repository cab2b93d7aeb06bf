//! Importing and exporting a whole state (`State::export`, `Command::Import`): how an
//! installation moves between storage backends.
//!
//! - A random history's export, imported into a fresh state in chunks (directly and through
//!   the journal codec), exports identically, answers every query the same, and then goes on
//!   exactly as the original: the same outcomes for the same further records.
//! - An import that does not fit (an id or key already held, an object it names missing, a
//!   rule of the state broken) is refused whole and changes nothing.
//! - The codec: every import record survives encoding; shortened or lengthened bytes are
//!   refused.

use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, Currency, HoldState, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord, TransferRejection,
};
use farthing_payments::codec;
use farthing_payments::*;
use farthing_testing::{Builder, StepSpec, currency, history, op_spec, step};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const CASES: u32 = 128;

/// A state and the builder that made it, from a history.
fn run(history: &[StepSpec]) -> (State, Builder) {
    let mut state = State::new();
    let mut builder = Builder::new();
    for step in history {
        let record = builder.record(step, &state);
        state.apply(&record);
    }
    (state, builder)
}

/// `items` as import records of at most `chunk` items each, at `now`.
fn import_records(items: &[Imported], chunk: usize, now: Timestamp) -> Vec<Record> {
    items
        .chunks(chunk.max(1))
        .map(|items| Record {
            now,
            idempotency: None,
            command: Command::Import(items.to_vec()),
        })
        .collect()
}

fn export(state: &State) -> Vec<Imported> {
    state.export().collect()
}

/// Every page of `principal`'s payments, `limit` at a time, following cursors.
fn payment_pages(state: &State, principal: Principal, limit: usize) -> Option<Vec<Vec<Payment>>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = state.list_payments(principal, limit, cursor).unwrap()?;
        let items: Vec<Payment> = page.items;
        cursor = items.last().map(|p| p.id);
        pages.push(items);
        if !page.has_more {
            return Some(pages);
        }
    }
}

/// Every page of a payer's statement, `limit` lines at a time, following cursors.
fn entry_pages(state: &State, payer: PayerId, limit: usize) -> Option<Vec<Vec<Entry>>> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = state.payer_entries(payer, limit, cursor).unwrap()?;
        cursor = page.items.last().map(|e| e.object);
        pages.push(page.items.clone());
        if !page.has_more {
            return Some(pages);
        }
    }
}

/// Checks that two states answer every question the API asks the same, for every party,
/// key, payment and idempotency key the builder made.
fn same_answers(a: &State, b: &State, builder: &Builder) -> Result<(), TestCaseError> {
    let mut principals = vec![Principal::Operator];
    principals.extend(builder.payer_ids.iter().map(|p| Principal::Payer(*p)));
    principals.extend(builder.merchant_ids.iter().map(|m| Principal::Merchant(*m)));
    for principal in principals {
        prop_assert_eq!(
            payment_pages(a, principal, 2),
            payment_pages(b, principal, 2),
            "payments of {:?}",
            principal
        );
    }
    for payer in &builder.payer_ids {
        prop_assert_eq!(entry_pages(a, *payer, 2), entry_pages(b, *payer, 2));
        prop_assert_eq!(
            a.payer_balances(*payer).unwrap(),
            b.payer_balances(*payer).unwrap()
        );
        prop_assert_eq!(a.payer(*payer), b.payer(*payer));
    }
    for merchant in &builder.merchant_ids {
        prop_assert_eq!(
            a.merchant_balances(*merchant).unwrap(),
            b.merchant_balances(*merchant).unwrap()
        );
        prop_assert_eq!(a.merchant(*merchant), b.merchant(*merchant));
    }
    for key in &builder.key_hashes {
        prop_assert_eq!(a.principal(key).unwrap(), b.principal(key).unwrap());
    }
    for (claim, _) in &builder.claimed {
        prop_assert_eq!(
            a.idempotency_lookup(&claim.key, &claim.fingerprint),
            b.idempotency_lookup(&claim.key, &claim.fingerprint)
        );
    }
    for id in &builder.payment_ids {
        prop_assert_eq!(a.payment(*id).unwrap(), b.payment(*id).unwrap());
    }
    for id in &builder.topup_ids {
        prop_assert_eq!(a.topup_record(*id), b.topup_record(*id));
    }
    for id in &builder.refund_ids {
        prop_assert_eq!(a.refund_record(*id), b.refund_record(*id));
    }
    prop_assert_eq!(a.currency_totals(), b.currency_totals());
    prop_assert_eq!(a.ledger_transfer_count(), b.ledger_transfer_count());
    prop_assert_eq!(a.has_operator_key(), b.has_operator_key());
    Ok(())
}

/// Imports `items` into a fresh state in chunks, each record through the codec when asked.
fn imported(items: &[Imported], chunk: usize, through_codec: bool) -> Result<State, TestCaseError> {
    let mut state = State::new();
    for record in import_records(items, chunk, Timestamp(1)) {
        let record = if through_codec {
            let mut bytes = Vec::new();
            codec::encode(&record, &mut bytes);
            codec::decode(&bytes).expect("an encoded import decodes")
        } else {
            record
        };
        let Command::Import(chunk) = &record.command else {
            unreachable!("import records only")
        };
        let count = chunk.len();
        prop_assert_eq!(state.apply(&record), Outcome::Imported { count });
    }
    Ok(state)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn an_export_imported_into_a_fresh_state_answers_the_same_and_goes_on_the_same(
        history in history(),
        chunk in 1..40usize,
        through_codec in any::<bool>(),
        more in prop::collection::vec(step(op_spec()), 1..30),
    ) {
        let (mut original, mut builder) = run(&history);
        let items = export(&original);
        let mut copy = imported(&items, chunk, through_codec)?;
        prop_assert_eq!(export(&copy), items);
        same_answers(&original, &copy, &builder)?;

        // The copy goes on as the original does: lists, statements, refunds of imported
        // payments, retries of imported idempotency keys, prunes.
        for step in &more {
            let record = builder.record(step, &original);
            let expected = original.apply(&record);
            prop_assert_eq!(copy.apply(&record), expected, "record {:?}", record);
        }
        prop_assert_eq!(export(&copy), export(&original));
        same_answers(&original, &copy, &builder)?;
    }

    #[test]
    fn an_export_lists_each_kind_of_object_in_its_canonical_order(history in history()) {
        let (state, _) = run(&history);
        let items = export(&state);
        let rank = |item: &Imported| match item {
            Imported::OperatorKey(_) => 0,
            Imported::Merchant { .. } => 1,
            Imported::Payer { .. } => 2,
            Imported::Account { .. } => 3,
            Imported::Transfer(_) => 4,
            Imported::Payment(_) => 5,
            Imported::Row(_) => 6,
            Imported::Topup(_) => 7,
            Imported::Refund(_) => 8,
            Imported::Entry { .. } => 9,
            Imported::Idempotency(_) => 10,
        };
        prop_assert!(items.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])));
        let holds: Vec<HoldRow> = items
            .iter()
            .filter_map(Imported::as_hold)
            .collect();
        prop_assert!(
            holds.windows(2).all(|w| w[0].payment < w[1].payment),
            "holds by payment"
        );
        // Payments as they stand: each with its hold.
        let stored: Vec<Payment> = items
            .iter()
            .filter_map(|item| match item {
                Imported::Payment(payment) => Some(payment.clone()),
                _ => None,
            })
            .collect();
        prop_assert!(
            stored.iter().all(|payment| payment.hold.is_none()),
            "a payment's stored form has no hold"
        );
        let payments: Vec<Payment> = stored
            .into_iter()
            .map(|mut payment| {
                if let Some(row) = holds.iter().find(|row| row.payment == payment.id) {
                    row.hold.apply_to(&mut payment);
                }
                payment
            })
            .collect();
        let mut newest_first: Vec<Payment> = state
            .list_payments(Principal::Operator, usize::MAX, None)
            .unwrap()
            .expect("the operator's list")
            .items;
        newest_first.reverse();
        prop_assert_eq!(payments, newest_first, "payments in the order made");
        prop_assert_eq!(items.len(), export(&state).len(), "an export can be taken again");
    }

    #[test]
    fn importing_an_export_into_the_state_it_came_from_is_refused_and_changes_nothing(
        history in history(),
    ) {
        let (mut state, _) = run(&history);
        let items = export(&state);
        prop_assume!(!items.is_empty());
        let outcome = state.apply(&Record {
            now: Timestamp(1),
            idempotency: None,
            command: Command::Import(items.clone()),
        });
        prop_assert_eq!(outcome, Outcome::Rejected(Rejection::IdCollision));
        prop_assert_eq!(export(&state), items);
    }
}

// =============================================================================================
// Imports that do not fit
// =============================================================================================

fn usd() -> Currency {
    currency("USD")
}

fn import(state: &mut State, items: Vec<Imported>) -> Outcome {
    state.apply(&Record {
        now: Timestamp(10),
        idempotency: None,
        command: Command::Import(items),
    })
}

fn payer(id: u128) -> Imported {
    Imported::Payer {
        payer: Payer {
            id: PayerId::from_u128(id),
            name: format!("payer {id}"),
            created_at: Timestamp(1),
        },
        key_hash: KeyHash([id as u8; 32]),
    }
}

fn merchant(id: u128) -> Imported {
    Imported::Merchant {
        merchant: Merchant {
            id: MerchantId::from_u128(id),
            name: format!("merchant {id}"),
            fee: FeeSchedule {
                bps: 100,
                fixed: Amount::ZERO,
            },
            created_at: Timestamp(1),
        },
        key_hash: KeyHash([id as u8; 32]),
    }
}

fn payment(id: u128, payer: u128, merchant: u128) -> Payment {
    Payment {
        id: PaymentId::from_u128(id),
        payer: PayerId::from_u128(payer),
        merchant: MerchantId::from_u128(merchant),
        amount: Amount::from_micros(1_000),
        currency: usd(),
        fee: Amount::from_micros(10),
        description: None,
        reference: None,
        created_at: Timestamp(5),
        amount_refunded: Amount::ZERO,
        fee_refunded: Amount::ZERO,
        hold: None,
    }
}

fn wallet(payer: u128, credits: u64, debits: u64) -> Imported {
    let owner = Owner::Payer(PayerId::from_u128(payer));
    Imported::Account {
        owner,
        account: Account {
            id: account_id(owner, usd()),
            kind: AccountKind::PayerWallet,
            currency: usd(),
            debits_posted: debits,
            credits_posted: credits,
            debits_pending: 0,
            credits_pending: 0,
        },
    }
}

/// Applies `items` to a state holding payer 1 and merchant 2, expecting `rejection` and no
/// change at all.
fn refused(items: Vec<Imported>, rejection: Rejection) {
    let mut state = State::new();
    assert_eq!(
        import(&mut state, vec![payer(1), merchant(2)]),
        Outcome::Imported { count: 2 }
    );
    let before = export(&state);
    assert_eq!(
        import(&mut state, items.clone()),
        Outcome::Rejected(rejection),
        "{items:?}"
    );
    assert_eq!(export(&state), before, "a refused import changes nothing");
}

#[test]
fn an_import_refuses_ids_and_keys_already_held() {
    refused(vec![payer(1)], Rejection::IdCollision);
    refused(vec![merchant(2)], Rejection::IdCollision);
    refused(vec![payer(3), payer(3)], Rejection::IdCollision);
    refused(
        vec![Imported::OperatorKey(KeyHash([1; 32]))],
        Rejection::IdCollision,
    );
    refused(
        vec![
            Imported::OperatorKey(KeyHash([9; 32])),
            Imported::OperatorKey(KeyHash([8; 32])),
        ],
        Rejection::IdCollision,
    );
    refused(
        vec![wallet(1, 5, 0), wallet(1, 5, 0)],
        Rejection::IdCollision,
    );
}

#[test]
fn an_import_refuses_items_naming_what_the_state_does_not_hold() {
    refused(vec![wallet(9, 5, 0)], Rejection::PayerNotFound);
    refused(
        vec![Imported::Payment(payment(10, 9, 2))],
        Rejection::PayerNotFound,
    );
    refused(
        vec![Imported::Payment(payment(10, 1, 9))],
        Rejection::MerchantNotFound,
    );
    let refund = Refund {
        id: RefundId::from_u128(11),
        payment: PaymentId::from_u128(10),
        payer: PayerId::from_u128(1),
        merchant: MerchantId::from_u128(2),
        amount: Amount::from_micros(5),
        currency: usd(),
        fee_refunded: Amount::ZERO,
        created_at: Timestamp(6),
    };
    refused(
        vec![Imported::Refund(refund.clone())],
        Rejection::PaymentNotFound,
    );
    let line = Entry {
        object: EntryObject::Topup(TopupId::from_u128(12)),
        currency: usd(),
        credit: true,
        amount: Amount::from_micros(5),
        balance_after: Amount::from_micros(5),
        created_at: Timestamp(6),
    };
    refused(
        vec![Imported::Entry {
            payer: PayerId::from_u128(1),
            entry: line,
        }],
        Rejection::ImportDoesNotFit,
    );
}

#[test]
fn an_import_refuses_objects_that_break_the_states_rules() {
    let mut fee_too_big = payment(10, 1, 2);
    fee_too_big.fee = Amount::from_micros(1_001);
    refused(
        vec![Imported::Payment(fee_too_big)],
        Rejection::ImportDoesNotFit,
    );
    let mut fee_share_wrong = payment(10, 1, 2);
    fee_share_wrong.amount_refunded = Amount::from_micros(500);
    fee_share_wrong.fee_refunded = Amount::from_micros(4);
    refused(
        vec![Imported::Payment(fee_share_wrong)],
        Rejection::ImportDoesNotFit,
    );
    refused(vec![wallet(1, 5, 6)], Rejection::ImportDoesNotFit);
    let owner = Owner::Payer(PayerId::from_u128(1));
    refused(
        vec![Imported::Account {
            owner,
            account: Account {
                id: AccountId(77),
                kind: AccountKind::PayerWallet,
                currency: usd(),
                debits_posted: 0,
                credits_posted: 0,
                debits_pending: 0,
                credits_pending: 0,
            },
        }],
        Rejection::ImportDoesNotFit,
    );
    let hold = TransferRecord {
        transfer: Transfer {
            id: TransferId(5),
            debit: AccountId(1),
            credit: AccountId(2),
            amount: Amount::from_micros(5),
            kind: TransferKind::Pending { timeout_secs: 60 },
            linked: false,
        },
        timestamp: Timestamp(1),
        outcome: Ok(()),
        hold: Some(HoldState::Pending),
        expires_at: Some(Timestamp(61_000_001)),
    };
    refused(vec![Imported::Transfer(hold)], Rejection::ImportDoesNotFit);
    // A statement line must show its object as it was made.
    let mut state_items = vec![Imported::Payment(payment(10, 1, 2))];
    state_items.push(Imported::Entry {
        payer: PayerId::from_u128(1),
        entry: Entry {
            object: EntryObject::Payment(PaymentId::from_u128(10)),
            currency: usd(),
            credit: true,
            amount: Amount::from_micros(1_000),
            balance_after: Amount::ZERO,
            created_at: Timestamp(5),
        },
    });
    refused(state_items, Rejection::ImportDoesNotFit);
}

/// Payment 10 of payer 1 at merchant 2, held: its pending transfer (id 5) and the hold,
/// `status` as given, 600 of its 1,000 captured if it was.
fn held_payment(status: HoldStatus) -> (TransferRecord, Payment, HoldRow) {
    let (payer, merchant) = (PayerId::from_u128(1), MerchantId::from_u128(2));
    let pending = TransferRecord {
        transfer: Transfer {
            id: TransferId(5),
            debit: account_id(Owner::Payer(payer), usd()),
            credit: account_id(Owner::Merchant(merchant), usd()),
            amount: Amount::from_micros(1_000),
            kind: TransferKind::Pending { timeout_secs: 0 },
            linked: false,
        },
        timestamp: Timestamp(5),
        outcome: Ok(()),
        hold: Some(match status {
            HoldStatus::Held => HoldState::Pending,
            HoldStatus::Captured => HoldState::Posted,
            HoldStatus::Canceled => HoldState::Voided,
            HoldStatus::Expired => HoldState::Expired,
        }),
        expires_at: None,
    };
    let captured = status == HoldStatus::Captured;
    let hold = Hold {
        status,
        amount_authorized: Amount::from_micros(1_000),
        amount_captured: Amount::from_micros(if captured { 600 } else { 0 }),
        fee_captured: Amount::from_micros(if captured { 6 } else { 0 }),
        expires_at: Timestamp(50),
        resolved_at: (status != HoldStatus::Held).then_some(Timestamp(20)),
        transfers: [TransferId(5), TransferId(6), TransferId(7)],
    };
    let mut payment = payment(10, 1, 2);
    if captured {
        // As an export lists it: with the figures of the capture.
        payment.amount = hold.amount_captured;
        payment.fee = hold.fee_captured;
    }
    let row = HoldRow {
        payment: payment.id,
        hold,
    };
    (pending, payment, row)
}

#[test]
fn a_hold_imports_beside_its_payment_and_pending_transfer() {
    for status in [
        HoldStatus::Held,
        HoldStatus::Captured,
        HoldStatus::Canceled,
        HoldStatus::Expired,
    ] {
        let mut state = State::new();
        let (pending, payment, row) = held_payment(status);
        let items = vec![
            payer(1),
            merchant(2),
            Imported::Transfer(pending),
            Imported::Payment(payment),
            Imported::hold(row),
        ];
        assert_eq!(import(&mut state, items), Outcome::Imported { count: 5 });
        let read = state.payment(row.payment).unwrap().expect("imported");
        assert_eq!(read.hold.as_deref(), Some(&row.hold), "{status:?}");
        assert_eq!(state.live_holds(), usize::from(status == HoldStatus::Held));
    }
}

#[test]
fn an_import_refuses_a_hold_unlike_its_payment_or_its_pending_transfer() {
    let (pending, payment, row) = held_payment(HoldStatus::Held);
    let with = |pending: TransferRecord, payment: Payment, row: HoldRow| {
        vec![
            Imported::Transfer(pending),
            Imported::Payment(payment),
            Imported::hold(row),
        ]
    };
    // Its payment, or its pending transfer, missing.
    refused(
        vec![Imported::Transfer(pending), Imported::hold(row)],
        Rejection::PaymentNotFound,
    );
    refused(
        vec![Imported::Payment(payment.clone()), Imported::hold(row)],
        Rejection::ImportDoesNotFit,
    );
    // Twice.
    let mut twice = with(pending, payment.clone(), row);
    twice.push(Imported::hold(row));
    refused(twice, Rejection::IdCollision);
    // Another amount than its transfer's, or than its payment's.
    let mut other = row;
    other.hold.amount_authorized = Amount::from_micros(999);
    refused(
        with(pending, payment.clone(), other),
        Rejection::ImportDoesNotFit,
    );
    let mut smaller = payment.clone();
    smaller.amount = Amount::from_micros(999);
    refused(with(pending, smaller, row), Rejection::ImportDoesNotFit);
    // Live, but its transfer was posted; or its transfer moves money between other accounts.
    let mut posted = pending;
    posted.hold = Some(HoldState::Posted);
    refused(
        with(posted, payment.clone(), row),
        Rejection::ImportDoesNotFit,
    );
    let mut elsewhere = pending;
    elsewhere.transfer.credit = account_id(Owner::PlatformFees, usd());
    refused(
        with(elsewhere, payment.clone(), row),
        Rejection::ImportDoesNotFit,
    );
    // Refunded while its money never moved.
    let mut refunded = payment.clone();
    refunded.amount_refunded = Amount::from_micros(100);
    refunded.fee_refunded = Amount::from_micros(1);
    refused(with(pending, refunded, row), Rejection::ImportDoesNotFit);
    // Settled without a time, or live with one.
    let mut resolved = row;
    resolved.hold.resolved_at = Some(Timestamp(20));
    refused(
        with(pending, payment.clone(), resolved),
        Rejection::ImportDoesNotFit,
    );
    // Captured, with its payment listed at the amount authorized rather than captured.
    let (pending, mut payment, row) = held_payment(HoldStatus::Captured);
    payment.amount = row.hold.amount_authorized;
    payment.fee = Amount::from_micros(10);
    refused(with(pending, payment, row), Rejection::ImportDoesNotFit);
}

#[test]
fn an_import_whose_last_item_does_not_fit_puts_in_none_of_the_others() {
    refused(
        vec![payer(3), merchant(4), wallet(3, 5, 0), payer(1)],
        Rejection::IdCollision,
    );
}

#[test]
fn an_import_is_not_kept_for_an_idempotency_key() {
    assert!(!Outcome::Imported { count: 3 }.is_kept_for_idempotency());
}

// =============================================================================================
// Codec
// =============================================================================================

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<char>(), 0..8).prop_map(|c| c.into_iter().collect()),
        Just("café 🪙".to_string()),
    ]
}

fn any_amount() -> impl Strategy<Value = Amount> {
    prop_oneof![
        Just(Amount::ZERO),
        Just(Amount::MAX),
        any::<u64>().prop_map(Amount::from_micros)
    ]
}

fn any_owner() -> impl Strategy<Value = Owner> {
    prop_oneof![
        any::<u128>().prop_map(|id| Owner::Payer(PayerId::from_u128(id))),
        any::<u128>().prop_map(|id| Owner::Merchant(MerchantId::from_u128(id))),
        Just(Owner::PlatformFees),
        Just(Owner::ExternalFunding),
    ]
}

fn any_principal() -> impl Strategy<Value = Principal> {
    prop_oneof![
        Just(Principal::Operator),
        any::<u128>().prop_map(|id| Principal::Merchant(MerchantId::from_u128(id))),
        any::<u128>().prop_map(|id| Principal::Payer(PayerId::from_u128(id))),
    ]
}

/// Every rejection the ledger has, by its stable tag.
fn transfer_rejections() -> Vec<TransferRejection> {
    (1..=u8::MAX)
        .map_while(farthing_payments::codec::transfer_rejection_of)
        .collect()
}

fn any_transfer_record() -> impl Strategy<Value = TransferRecord> {
    (
        (any::<u128>(), any::<u64>(), any::<u64>(), any_amount()),
        prop_oneof![
            Just(TransferKind::Posted),
            any::<u32>().prop_map(|timeout_secs| TransferKind::Pending { timeout_secs }),
            any::<u128>().prop_map(|id| TransferKind::PostPending {
                pending_id: TransferId(id)
            }),
            any::<u128>().prop_map(|id| TransferKind::VoidPending {
                pending_id: TransferId(id)
            }),
        ],
        (any::<bool>(), any::<u64>()),
        prop::option::of(prop::sample::select(transfer_rejections())),
        prop::option::of(prop::sample::select(vec![
            HoldState::Pending,
            HoldState::Posted,
            HoldState::Voided,
            HoldState::Expired,
        ])),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |((id, debit, credit, amount), kind, (linked, at), rejection, hold, expires)| {
                TransferRecord {
                    transfer: Transfer {
                        id: TransferId(id),
                        debit: AccountId(debit),
                        credit: AccountId(credit),
                        amount,
                        kind,
                        linked,
                    },
                    timestamp: Timestamp(at),
                    outcome: rejection.map_or(Ok(()), Err),
                    hold,
                    expires_at: expires.map(Timestamp),
                }
            },
        )
}

fn any_imported() -> impl Strategy<Value = Imported> {
    let key = prop::array::uniform32(any::<u8>()).prop_map(KeyHash);
    prop_oneof![
        key.clone().prop_map(Imported::OperatorKey),
        (
            any::<u128>(),
            any_text(),
            key.clone(),
            any::<u32>(),
            any_amount(),
            any::<u64>()
        )
            .prop_map(|(id, name, key_hash, bps, fixed, at)| Imported::Merchant {
                merchant: Merchant {
                    id: MerchantId::from_u128(id),
                    name,
                    fee: FeeSchedule { bps, fixed },
                    created_at: Timestamp(at),
                },
                key_hash,
            }),
        (any::<u128>(), any_text(), key, any::<u64>()).prop_map(|(id, name, key_hash, at)| {
            Imported::Payer {
                payer: Payer {
                    id: PayerId::from_u128(id),
                    name,
                    created_at: Timestamp(at),
                },
                key_hash,
            }
        }),
        (
            any_owner(),
            any::<u64>(),
            prop::sample::select(vec![
                AccountKind::PayerWallet,
                AccountKind::Merchant,
                AccountKind::PlatformFees,
                AccountKind::ExternalFunding,
            ]),
            prop::array::uniform4(any::<u64>()),
        )
            .prop_map(|(owner, id, kind, totals)| Imported::Account {
                owner,
                account: Account {
                    id: AccountId(id),
                    kind,
                    currency: currency("EUR"),
                    debits_posted: totals[0],
                    credits_posted: totals[1],
                    debits_pending: totals[2],
                    credits_pending: totals[3],
                },
            }),
        any_transfer_record().prop_map(Imported::Transfer),
        (
            prop::array::uniform3(any::<u128>()),
            prop::array::uniform4(any_amount()),
            (prop::option::of(any_text()), prop::option::of(any_text())),
            any::<u64>(),
        )
            .prop_map(|(ids, amounts, (description, reference), at)| {
                Imported::Payment(Payment {
                    id: PaymentId::from_u128(ids[0]),
                    payer: PayerId::from_u128(ids[1]),
                    merchant: MerchantId::from_u128(ids[2]),
                    amount: amounts[0],
                    currency: currency("JPY"),
                    fee: amounts[1],
                    description,
                    reference,
                    created_at: Timestamp(at),
                    amount_refunded: amounts[2],
                    fee_refunded: amounts[3],
                    hold: None,
                })
            }),
        (
            prop::array::uniform4(any::<u128>()),
            (1..=4u8, prop::array::uniform3(any_amount())),
            (any::<u64>(), prop::option::of(any::<u64>())),
        )
            .prop_map(|(ids, (status, amounts), (expires_at, resolved_at))| {
                Imported::hold(HoldRow {
                    payment: PaymentId::from_u128(ids[0]),
                    hold: Hold {
                        status: HoldStatus::of_code(status).expect("a status"),
                        amount_authorized: amounts[0],
                        amount_captured: amounts[1],
                        fee_captured: amounts[2],
                        expires_at: Timestamp(expires_at),
                        resolved_at: resolved_at.map(Timestamp),
                        transfers: [TransferId(ids[1]), TransferId(ids[2]), TransferId(ids[3])],
                    },
                })
            }),
        (
            prop::array::uniform2(any::<u128>()),
            any_amount(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(ids, amount, decline, at)| Imported::Topup(Topup {
                id: TopupId::from_u128(ids[0]),
                payer: PayerId::from_u128(ids[1]),
                amount,
                currency: usd(),
                source: if decline {
                    FundingSource::SandboxDecline
                } else {
                    FundingSource::Sandbox
                },
                created_at: Timestamp(at),
            })),
        (
            prop::array::uniform4(any::<u128>()),
            prop::array::uniform2(any_amount()),
            any::<u64>()
        )
            .prop_map(|(ids, amounts, at)| Imported::Refund(Refund {
                id: RefundId::from_u128(ids[0]),
                payment: PaymentId::from_u128(ids[1]),
                payer: PayerId::from_u128(ids[2]),
                merchant: MerchantId::from_u128(ids[3]),
                amount: amounts[0],
                currency: usd(),
                fee_refunded: amounts[1],
                created_at: Timestamp(at),
            })),
        (
            prop::array::uniform2(any::<u128>()),
            0..3u8,
            any::<bool>(),
            prop::array::uniform2(any_amount()),
            any::<u64>(),
        )
            .prop_map(|(ids, kind, credit, amounts, at)| Imported::Entry {
                payer: PayerId::from_u128(ids[0]),
                entry: Entry {
                    object: match kind {
                        0 => EntryObject::Topup(TopupId::from_u128(ids[1])),
                        1 => EntryObject::Payment(PaymentId::from_u128(ids[1])),
                        _ => EntryObject::Refund(RefundId::from_u128(ids[1])),
                    },
                    currency: usd(),
                    credit,
                    amount: amounts[0],
                    balance_after: amounts[1],
                    created_at: Timestamp(at),
                },
            }),
        (
            any_principal(),
            any_text(),
            prop::array::uniform32(any::<u8>()),
            any::<u64>(),
            prop_oneof![
                Just(Outcome::OperatorKeySet),
                Just(Outcome::Pruned),
                Just(Outcome::Rejected(Rejection::InsufficientFunds)),
                any::<u128>().prop_map(|id| Outcome::PaidBatch(vec![
                    BatchItemOutcome::Succeeded(PaymentId::from_u128(id)),
                    BatchItemOutcome::Failed(Rejection::FundingDeclined),
                ])),
            ],
        )
            .prop_map(|(principal, key, fingerprint, made, outcome)| {
                Imported::Idempotency(IdempotencyRow {
                    key: IdempotencyKey { principal, key },
                    fingerprint,
                    outcome,
                    made: Timestamp(made),
                })
            }),
    ]
}

fn any_import_record() -> impl Strategy<Value = Record> {
    (any::<u64>(), prop::collection::vec(any_imported(), 0..6)).prop_map(|(now, items)| Record {
        now: Timestamp(now),
        idempotency: None,
        command: Command::Import(items),
    })
}

fn encoded(record: &Record) -> Vec<u8> {
    let mut bytes = Vec::new();
    codec::encode(record, &mut bytes);
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn every_import_record_decodes_to_itself_after_encoding(record in any_import_record()) {
        prop_assert_eq!(codec::decode(&encoded(&record)), Ok(record));
    }

    #[test]
    fn an_import_record_cut_short_at_any_length_does_not_decode(record in any_import_record()) {
        let bytes = encoded(&record);
        for len in 0..bytes.len() {
            prop_assert!(codec::decode(&bytes[..len]).is_err(), "{} of {} bytes", len, bytes.len());
        }
    }

    #[test]
    fn an_import_record_with_bytes_after_it_does_not_decode(
        record in any_import_record(),
        extra in 1..4usize,
    ) {
        let mut bytes = encoded(&record);
        bytes.extend(std::iter::repeat_n(0u8, extra));
        prop_assert_eq!(codec::decode(&bytes), Err(codec::DecodeError::TrailingBytes));
    }
}

#[test]
fn an_import_claiming_more_items_than_its_bytes_hold_is_refused() {
    let record = Record {
        now: Timestamp(1),
        idempotency: None,
        command: Command::Import(Vec::new()),
    };
    let mut bytes = encoded(&record);
    let count = bytes.len() - 4;
    bytes[count..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        codec::decode(&bytes),
        Err(codec::DecodeError::UnexpectedEnd)
    );
}
