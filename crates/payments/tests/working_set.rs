//! Working sets (ADR 0002): a state holding only the objects a record reads gives the record
//! the outcome the whole state gives, and its change set, written over the stored objects,
//! leaves them as the whole state has them.
//!
//! Random histories (parties, top-ups, payments and batches, refunds, holds placed, captured,
//! canceled and expired, idempotency keys retried and reused, prunes, ids, key hashes and
//! transfer ids reused) run on a whole state. Before
//! each record (or each batch of records), a working set is loaded from the whole state with
//! what `needs` lists, as a PostgreSQL loader would load it from tables; the record is applied
//! to both. A table model of the listed objects, taken before and changed by the working
//! set's change set, must equal the same model taken after.

use std::collections::BTreeMap;

use farthing_ledger::{Account, Amount, Currency, Timestamp, TransferId, TransferRecord};
use farthing_payments::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use farthing_testing::*;

const CASES: u32 = 128;

// =============================================================================================
// Loading, and a table model of storage
// =============================================================================================

/// The live holds due by `at` among `holds`, as a loader finds them in a table of holds:
/// oldest deadline first, at most `most`.
fn holds_due(whole: &State, holds: &[PaymentId], at: Timestamp, most: usize) -> Vec<PaymentId> {
    let mut due: Vec<(Timestamp, PaymentId)> = holds
        .iter()
        .filter_map(|id| {
            let hold = whole.payment(*id).unwrap()?.hold?;
            (hold.is_live() && hold.expires_at <= at).then_some((hold.expires_at, *id))
        })
        .collect();
    due.sort_unstable();
    due.dedup();
    due.truncate(most);
    due.into_iter().map(|(_, id)| id).collect()
}

/// Copies into `working` what `needs` lists and `whole` holds, skipping what `working` already
/// holds: what a loader reads from the tables. `holds` lists every payment authorized for
/// capture later, for the due holds the batch's expiries ask for.
fn load(working: &mut State, whole: &State, needs: &Needs, holds: &[PaymentId]) {
    let ok = |result: Result<(), LoadError>| result.expect("a loaded object fits the working set");
    if needs.operator_key
        && let Some(key) = whole.operator_key()
        && working.principal(&key).unwrap().is_none()
    {
        ok(working.insert_key(key, Principal::Operator));
    }
    for key in &needs.key_hashes {
        if let Some(principal) = whole.principal(key).unwrap()
            && working.principal(key).unwrap().is_none()
        {
            ok(working.insert_key(*key, principal));
        }
    }
    // Parties before their accounts.
    for id in &needs.merchants {
        if let Some(merchant) = whole.merchant(*id)
            && working.merchant(*id).is_none()
        {
            ok(working.insert_merchant(merchant.clone()));
        }
    }
    for id in &needs.payers {
        if let Some(payer) = whole.payer(*id)
            && working.payer(*id).is_none()
        {
            ok(working.insert_payer(payer.clone()));
        }
    }
    for &(owner, currency) in &needs.accounts {
        if let Some(account) = whole.account_of(owner, currency)
            && working.account_of(owner, currency).is_none()
        {
            ok(working.insert_account(owner, account));
        }
    }
    let due = needs
        .holds_due
        .map_or_else(Vec::new, |(at, most)| holds_due(whole, holds, at, most));
    for id in needs.payments.iter().chain(&due) {
        if let Some(payment) = whole.payment(*id).unwrap()
            && working.payment(*id).unwrap().is_none()
        {
            ok(working.insert_payment(payment.clone()));
        }
    }
    let due_rows = due.iter().map(|id| (HoldKind::TAG, id.to_u128()));
    for (tag, id) in needs.rows.iter().copied().chain(due_rows) {
        if !working.knows_row(tag, id) {
            let row = whole.row(tag, id).unwrap();
            ok(working.insert_row(tag, id, row.as_ref().map(|row| row.bytes.as_slice())));
        }
    }
    for id in &needs.topups {
        if let Some(topup) = whole.topup_record(*id)
            && working.topup_record(*id).is_none()
        {
            ok(working.insert_topup(topup.clone()));
        }
    }
    for id in &needs.refunds {
        if let Some(refund) = whole.refund_record(*id)
            && working.refund_record(*id).is_none()
        {
            ok(working.insert_refund(refund.clone()));
        }
    }
    for id in needs.transfers.iter().chain(&needs.held_transfers) {
        if let Some(record) = whole.transfer_record(*id)
            && working.transfer_record(*id).is_none()
        {
            ok(working.insert_transfer_record(record));
        }
    }
    let rows: Vec<IdempotencyRow> = needs
        .idempotency_keys
        .iter()
        .filter_map(|key| whole.idempotency_record(key))
        .collect();
    for row in rows {
        if working.idempotency_record(&row.key).is_none() {
            ok(working.insert_idempotency_record(row));
        }
    }
}

/// A working set for `records`, loaded from `whole` as a loader does: ask the working set what
/// the records need, load it, and ask again only while the answer is incomplete and something
/// new is asked for.
fn working_set_for(
    whole: &State,
    records: &[Record],
    holds: &[PaymentId],
) -> Result<(State, Needs), TestCaseError> {
    let mut working = State::new_working_set();
    let needs_of = |working: &State| {
        let mut needs = Needs::default();
        needs.extend(
            working.needs_of_batch(
                records
                    .iter()
                    .map(|record| (record.idempotency.as_ref(), &record.command)),
            ),
        );
        needs
    };
    let mut needs = needs_of(&working);
    for round in 1.. {
        prop_assert!(round <= 2, "loading settles in two rounds");
        load(&mut working, whole, &needs, holds);
        if !needs.incomplete {
            break;
        }
        let again = needs_of(&working);
        if again == needs {
            break;
        }
        needs = again;
    }
    Ok((working, needs))
}

/// The stored rows of the objects `needs` lists, as storage would hold them.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
struct Tables {
    keys: BTreeMap<KeyHash, Principal>,
    merchants: BTreeMap<MerchantId, Merchant>,
    payers: BTreeMap<PayerId, Payer>,
    accounts: BTreeMap<(Owner, Currency), Account>,
    /// Payments as they stand: their holds applied.
    payments: BTreeMap<PaymentId, Payment>,
    topups: BTreeMap<TopupId, Topup>,
    refunds: BTreeMap<RefundId, Refund>,
    /// Each listed payer's statement, oldest first.
    statements: BTreeMap<PayerId, Vec<Entry>>,
    transfers: BTreeMap<TransferId, TransferRecord>,
    idempotency: BTreeMap<IdempotencyKey, IdempotencyRow>,
}

impl Tables {
    fn of(state: &State, needs: &Needs) -> Tables {
        let mut tables = Tables::default();
        let mut key_hashes = needs.key_hashes.clone();
        if needs.operator_key {
            key_hashes.extend(state.operator_key());
        }
        for key in key_hashes {
            if let Some(principal) = state.principal(&key).unwrap() {
                tables.keys.insert(key, principal);
            }
        }
        for id in &needs.merchants {
            if let Some(merchant) = state.merchant(*id) {
                tables.merchants.insert(*id, merchant.clone());
            }
        }
        for id in &needs.payers {
            if let Some(payer) = state.payer(*id) {
                tables.payers.insert(*id, payer.clone());
                let mut statement = state
                    .payer_entries(*id, usize::MAX, None)
                    .unwrap()
                    .expect("a known payer")
                    .items;
                statement.reverse();
                tables.statements.insert(*id, statement);
            }
        }
        for &(owner, currency) in &needs.accounts {
            if let Some(account) = state.account_of(owner, currency) {
                tables.accounts.insert((owner, currency), account);
            }
        }
        for id in &needs.payments {
            if let Some(payment) = state.payment(*id).unwrap() {
                tables.payments.insert(*id, payment.clone());
            }
        }
        for id in &needs.topups {
            if let Some(topup) = state.topup_record(*id) {
                tables.topups.insert(*id, topup.clone());
            }
        }
        for id in &needs.refunds {
            if let Some(refund) = state.refund_record(*id) {
                tables.refunds.insert(*id, refund.clone());
            }
        }
        for id in needs.transfers.iter().chain(&needs.held_transfers) {
            if let Some(record) = state.transfer_record(*id) {
                tables.transfers.insert(*id, record);
            }
        }
        let rows: Vec<IdempotencyRow> = needs
            .idempotency_keys
            .iter()
            .filter_map(|key| state.idempotency_record(key))
            .collect();
        for row in rows {
            tables.idempotency.insert(row.key.clone(), row);
        }
        tables
    }

    /// Writes a change set, in the order `Changes` documents. A new row whose key is taken, or
    /// an update of a row not held, is an error.
    fn write(&mut self, changes: &Changes) -> Result<(), TestCaseError> {
        fn insert<K: Ord + std::fmt::Debug, V>(
            table: &mut BTreeMap<K, V>,
            key: K,
            value: V,
        ) -> Result<(), TestCaseError> {
            prop_assert!(
                !table.contains_key(&key),
                "a new row's key {:?} is free",
                key
            );
            table.insert(key, value);
            Ok(())
        }
        for (key, principal) in &changes.keys {
            match principal {
                Some(principal) => self.keys.insert(*key, *principal),
                None => self.keys.remove(key),
            };
        }
        for merchant in &changes.merchants {
            insert(&mut self.merchants, merchant.id, merchant.clone())?;
        }
        for payer in &changes.payers {
            insert(&mut self.payers, payer.id, payer.clone())?;
            insert(&mut self.statements, payer.id, Vec::new())?;
        }
        for (owner, account) in &changes.accounts_created {
            insert(&mut self.accounts, (*owner, account.currency), *account)?;
        }
        for account in &changes.account_totals {
            let stored = self.accounts.values_mut().find(|a| a.id == account.id);
            prop_assert!(
                stored.is_some(),
                "a changed account {:?} is held",
                account.id
            );
            let stored = stored.expect("checked");
            prop_assert_ne!(*stored, *account, "an account listed as changed changed");
            *stored = *account;
        }
        for topup in &changes.topups {
            insert(&mut self.topups, topup.id, topup.clone())?;
        }
        for payment in &changes.payments {
            insert(&mut self.payments, payment.id, payment.clone())?;
        }
        for change in &changes.payments_refunded {
            let stored = self.payments.get_mut(&change.id);
            prop_assert!(
                stored.is_some(),
                "a refunded payment {:?} is held",
                change.id
            );
            let stored = stored.expect("checked");
            prop_assert_ne!(stored.amount_refunded, change.amount_refunded);
            stored.amount_refunded = change.amount_refunded;
            stored.fee_refunded = change.fee_refunded;
        }
        for refund in &changes.refunds {
            insert(&mut self.refunds, refund.id, refund.clone())?;
        }
        for (payer, entry) in &changes.entries {
            let statement = self.statements.get_mut(payer);
            prop_assert!(
                statement.is_some(),
                "a statement line's payer {:?} is held",
                payer
            );
            statement.expect("checked").push(*entry);
        }
        for record in &changes.transfers {
            insert(&mut self.transfers, record.transfer.id, *record)?;
        }
        for record in &changes.transfers_resolved {
            let stored = self.transfers.get_mut(&record.transfer.id);
            prop_assert!(
                stored.is_some(),
                "a resolved transfer {:?} is held",
                record.transfer.id
            );
            let stored = stored.expect("checked");
            prop_assert_eq!(stored.transfer, record.transfer, "only its hold changes");
            *stored = *record;
        }
        for row in &changes.rows {
            let row = row.decode::<HoldKind>().expect("holds are the only kind")?;
            let stored = self.payments.get_mut(&row.payment);
            prop_assert!(
                stored.is_some(),
                "a hold's payment {:?} is held",
                row.payment
            );
            row.hold.apply_to(stored.expect("checked"));
        }
        for before in &changes.prunes {
            self.idempotency.retain(|_, row| row.made >= *before);
        }
        for row in &changes.idempotency {
            insert(&mut self.idempotency, row.key.clone(), row.clone())?;
        }
        Ok(())
    }
}

// =============================================================================================
// The properties
// =============================================================================================

/// Applies `batch` to the whole state and to a working set loaded for it, and checks that the
/// outcomes agree and that the change set carries the stored rows from before to after.
/// `whole` tracks its own changes, which must be the same change set.
fn check_batch(
    whole: &mut State,
    embedded: &mut State,
    batch: &[Record],
    holds: &[PaymentId],
) -> Result<(), TestCaseError> {
    let (mut working, needs) = working_set_for(whole, batch, holds)?;
    let mut needs_of_whole = Needs::default();
    needs_of_whole.extend(
        whole.needs_of_batch(
            batch
                .iter()
                .map(|record| (record.idempotency.as_ref(), &record.command)),
        ),
    );
    prop_assert_eq!(
        &needs,
        &needs_of_whole,
        "the working set asks for what the whole state does"
    );
    // Read a part at a time (a writer reading ahead for a large batch), the parts together
    // list what the whole does.
    for count in [1, 2, 3, 7] {
        let parts = needs.clone().split(count);
        prop_assert_eq!(parts.len(), count);
        let mut joined = Needs::default();
        for part in parts {
            joined.extend(part);
        }
        prop_assert_eq!(&joined, &needs, "{} parts together list the whole", count);
    }
    let before = Tables::of(whole, &needs);
    prop_assert!(
        whole.take_changes().is_empty(),
        "nothing changed between batches"
    );
    for record in batch {
        let expected = embedded.apply(record);
        prop_assert_eq!(
            &whole.apply(record),
            &expected,
            "tracking changes nothing: {:?}",
            record
        );
        prop_assert_eq!(&working.apply(record), &expected, "record {:?}", record);
    }
    let changes = working.take_changes();
    prop_assert!(working.take_changes().is_empty(), "changes are taken once");
    let mut written = before;
    written.write(&changes)?;
    prop_assert_eq!(
        &written,
        &Tables::of(whole, &needs),
        "changes {:?}",
        changes
    );
    prop_assert_eq!(&whole.take_changes(), &changes);
    Ok(())
}

/// Runs a history in batches of the given sizes (cycled).
fn run(history: &[StepSpec], batch_sizes: &[usize]) -> Result<(), TestCaseError> {
    let mut whole = State::new();
    whole.track_changes();
    let mut embedded = State::new();
    let mut builder = Builder::new();
    let mut steps = history.iter();
    for &size in batch_sizes.iter().cycle() {
        // Records are built against the state before the batch, as a server builds requests
        // before the writer batches them.
        let batch: Vec<Record> = steps
            .by_ref()
            .take(size)
            .map(|step| builder.record(step, &whole))
            .collect();
        if batch.is_empty() {
            break;
        }
        check_batch(&mut whole, &mut embedded, &batch, &builder.hold_ids)?;
    }
    prop_assert!(!embedded.is_tracking_changes());
    prop_assert!(
        embedded.take_changes().is_empty(),
        "the embedded state tracks nothing"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn every_record_applied_to_a_working_set_of_what_it_needs_agrees_with_the_whole_state(
        history in history(),
    ) {
        run(&history, &[1])?;
    }

    #[test]
    fn batches_of_records_applied_to_one_working_set_agree_with_the_whole_state(
        history in history(),
        sizes in prop::collection::vec(1..8usize, 1..4),
    ) {
        run(&history, &sizes)?;
    }

    #[test]
    fn imports_applied_to_working_sets_agree_with_the_whole_state_and_what_follows_does_too(
        history in history(),
        chunk in 1..30usize,
        sizes in prop::collection::vec(1..4usize, 1..3),
        more in prop::collection::vec(step(op_spec()), 1..20),
    ) {
        // An installation made by a history, exported as import records.
        let mut source = State::new();
        let mut builder = Builder::new();
        for step in &history {
            let record = builder.record(step, &source);
            source.apply(&record);
        }
        let items: Vec<Imported> = source.export().collect();
        let imports: Vec<Record> = items
            .chunks(chunk)
            .map(|items| Record {
                now: source.last_time(),
                idempotency: None,
                command: Command::Import(items.to_vec()),
            })
            .collect();

        let mut whole = State::new();
        whole.track_changes();
        let mut embedded = State::new();
        let mut records = imports.iter();
        for &size in sizes.iter().cycle() {
            let batch: Vec<Record> = records.by_ref().take(size).cloned().collect();
            if batch.is_empty() {
                break;
            }
            check_batch(&mut whole, &mut embedded, &batch, &builder.hold_ids)?;
        }
        prop_assert_eq!(whole.export().collect::<Vec<_>>(), items);
        // Records after the import, one batch each.
        for step in &more {
            let record = builder.record(step, &whole);
            check_batch(&mut whole, &mut embedded, &[record], &builder.hold_ids)?;
        }
    }

    #[test]
    fn a_payment_needs_at_most_its_payer_its_merchant_and_three_accounts(
        history in history(),
    ) {
        let mut state = State::new();
        let mut builder = Builder::new();
        for step in &history {
            let record = builder.record(step, &state);
            let needs = state.needs(&record);
            if let Command::Pay(pay) = &record.command {
                prop_assert_eq!(&needs.payers, &vec![pay.payer]);
                prop_assert_eq!(&needs.merchants, &vec![pay.merchant]);
                let mut accounts = vec![
                    (Owner::Payer(pay.payer), pay.currency),
                    (Owner::Merchant(pay.merchant), pay.currency),
                    (Owner::PlatformFees, pay.currency),
                ];
                accounts.sort();
                prop_assert_eq!(&needs.accounts, &accounts);
                prop_assert!(needs.key_hashes.is_empty() && needs.topups.is_empty());
                prop_assert!(needs.refunds.is_empty() && !needs.operator_key);
            }
            if let Command::Refund { .. } = &record.command {
                prop_assert!(needs.payers.len() <= 1 && needs.merchants.is_empty());
                prop_assert!(needs.accounts.len() <= 3 && needs.payments.len() == 1);
            }
            state.apply(&record);
        }
    }
}

#[test]
fn loading_an_object_twice_is_refused() {
    let usd = currency("USD");
    let payer = PayerId::from_u128(7);
    let mut whole = State::new();
    whole.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: payer,
            name: "p".to_string(),
            key_hash: KeyHash([1; 32]),
        },
    });
    whole.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(8),
            payer,
            amount: Amount::from_micros(5),
            currency: usd,
            source: FundingSource::Sandbox,
            transfer_id: TransferId(9),
        },
    });
    let mut working = State::new_working_set();
    let stored = whole.payer(payer).expect("made above").clone();
    let wallet = whole
        .account_of(Owner::Payer(payer), usd)
        .expect("topped up above");
    assert_eq!(working.insert_payer(stored.clone()), Ok(()));
    assert_eq!(working.insert_payer(stored), Err(LoadError::AlreadyLoaded));
    assert_eq!(working.insert_account(Owner::Payer(payer), wallet), Ok(()));
    assert_eq!(
        working.insert_account(Owner::Payer(payer), wallet),
        Err(LoadError::AlreadyLoaded)
    );
    assert_eq!(
        working.insert_account(Owner::PlatformFees, wallet),
        Err(LoadError::BadId),
        "an account goes in under the owner its id is derived from"
    );
    assert_eq!(
        working.payer_balances(payer).unwrap(),
        whole.payer_balances(payer).unwrap()
    );
    assert!(working.take_changes().is_empty(), "loading is not a change");
}

#[test]
fn a_transfer_loaded_while_changes_are_untaken_is_not_reported_as_new() {
    let mut working = State::new_working_set();
    let payer = PayerId::from_u128(1);
    working.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: payer,
            name: "p".to_string(),
            key_hash: KeyHash([1; 32]),
        },
    });
    working.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(2),
            payer,
            amount: Amount::from_micros(5),
            currency: currency("USD"),
            source: FundingSource::Sandbox,
            transfer_id: TransferId(3),
        },
    });
    let mut other = State::new();
    other.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::CreatePayer {
            id: PayerId::from_u128(4),
            name: "q".to_string(),
            key_hash: KeyHash([2; 32]),
        },
    });
    other.apply(&Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command: Command::Topup {
            id: TopupId::from_u128(5),
            payer: PayerId::from_u128(4),
            amount: Amount::from_micros(5),
            currency: currency("USD"),
            source: FundingSource::Sandbox,
            transfer_id: TransferId(6),
        },
    });
    let record = other.transfer_record(TransferId(6)).expect("made above");
    // A cache loads what a batch reads while earlier changes wait for a checkpoint.
    assert_eq!(working.insert_transfer_record(record), Ok(()));
    assert_eq!(
        working.insert_transfer_record(record),
        Err(LoadError::AlreadyLoaded)
    );
    let changes = working.take_changes();
    assert_eq!(
        changes
            .transfers
            .iter()
            .map(|record| record.transfer.id)
            .collect::<Vec<_>>(),
        vec![TransferId(3)],
        "the top-up's record is new, the loaded one is not"
    );
    assert!(working.take_changes().transfers.is_empty());
}

#[test]
fn a_batch_that_replaces_the_operator_key_frees_the_old_one_for_a_new_party() {
    let record = |command| Record {
        now: Timestamp(EPOCH),
        idempotency: None,
        command,
    };
    let (old, new) = (KeyHash([1; 32]), KeyHash([2; 32]));
    let mut whole = State::new();
    whole.apply(&record(Command::SetOperatorKey { key_hash: old }));
    let batch = [
        record(Command::SetOperatorKey { key_hash: new }),
        record(Command::CreatePayer {
            id: PayerId::from_u128(3),
            name: "p".to_string(),
            key_hash: old,
        }),
    ];
    let mut embedded = State::new();
    embedded.apply(&record(Command::SetOperatorKey { key_hash: old }));
    whole.track_changes();
    check_batch(&mut whole, &mut embedded, &batch, &[]).expect("the working set agrees");
    assert_eq!(
        whole.principal(&old).unwrap(),
        Some(Principal::Payer(PayerId::from_u128(3)))
    );
}

#[test]
fn expiries_void_the_oldest_deadlines_first_a_thousand_at_a_time_in_a_working_set_too() {
    let at = |secs: u64| Timestamp(EPOCH + secs * MICROS_PER_SEC);
    let record = |now: Timestamp, command| Record {
        now,
        idempotency: None,
        command,
    };
    let mut whole = State::new();
    let mut embedded = State::new();
    let (records, holds) = farthing_testing::many_holds();
    for record in &records {
        let outcome = whole.apply(record);
        assert!(
            !matches!(outcome, Outcome::Rejected(_)),
            "{record:?}: {outcome:?}"
        );
        embedded.apply(record);
    }
    whole.track_changes();
    // By deadline, then by payment: the order expiries take them in.
    let mut order: Vec<(Timestamp, PaymentId)> = holds
        .iter()
        .map(|id| {
            (
                whole
                    .payment(*id)
                    .unwrap()
                    .unwrap()
                    .hold
                    .unwrap()
                    .expires_at,
                *id,
            )
        })
        .collect();
    order.sort_unstable();
    let live = |whole: &State| -> Vec<PaymentId> {
        order
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| whole.payment(*id).unwrap().unwrap().hold.unwrap().is_live())
            .collect()
    };
    // Two expiries in one batch, then one alone: a thousand, a thousand, the rest.
    let expire = |secs| record(at(200), Command::from(HoldCommand::Expire { at: at(secs) }));
    check_batch(
        &mut whole,
        &mut embedded,
        &[expire(200), expire(200)],
        &holds,
    )
    .expect("the working set agrees");
    let last: Vec<PaymentId> = order[order.len() - 7..].iter().map(|(_, id)| *id).collect();
    assert_eq!(live(&whole), last, "the latest deadlines are left");
    check_batch(&mut whole, &mut embedded, &[expire(200)], &holds).expect("it agrees");
    assert_eq!(live(&whole), vec![]);
    assert_eq!(whole.live_holds(), 0);
}
