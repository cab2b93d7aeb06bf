//! Batches commit in the order their accounts' locks are granted, which need not be the order
//! of their times: two servers' clocks differ, and a batch that took its time first may wait
//! for another's locks. Lists are ordered by time, so a batch that touches an account must be
//! given a time later than any earlier change to that account, or a statement would show a
//! running balance that is not the newest.
//!
//! Also here: prunes of idempotency keys, which go by age and read nothing.

mod common;

use common::{TestDatabase, shop_and_payer};
use farthing_ledger::{Amount, MICROS_PER_UNIT, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store_postgres::{apply_batch, query};

const T: u64 = 1_700_000_000_000_000;

fn record(now: u64, command: Command) -> Record {
    Record {
        now: Timestamp(now),
        idempotency: None,
        command,
    }
}

#[tokio::test]
async fn a_batch_applied_after_a_later_timed_one_comes_after_it_in_the_statement() {
    let Some(db) = TestDatabase::create("a_batch_applied_after_a_later_timed_one").await else {
        return;
    };
    let mut client = db.migrated().await;
    let usd = farthing_ledger::Currency::parse("USD").unwrap();
    let (setup, merchant, payer) = shop_and_payer(100);
    let pay = |id: u128, units: u64| {
        Command::Pay(PayCommand {
            id: PaymentId::from_u128(id),
            payer,
            merchant,
            amount: Amount::from_micros(units * MICROS_PER_UNIT),
            currency: usd,
            description: None,
            reference: None,
            transfer_ids: [TransferId(id * 10), TransferId(id * 10 + 1)],
        })
    };
    apply_batch(&mut client, &setup).await.unwrap();
    // The batch timed later commits first; the one timed earlier commits after it.
    let later = apply_batch(&mut client, &[record(T + 2_000, pay(100, 5))])
        .await
        .unwrap();
    let earlier = apply_batch(&mut client, &[record(T + 1_000, pay(200, 7))])
        .await
        .unwrap();
    let (Outcome::Paid(later), Outcome::Paid(earlier)) = (&later[0], &earlier[0]) else {
        panic!("both payments succeed: {later:?} {earlier:?}");
    };
    assert!(
        earlier.created_at > later.created_at,
        "the payment committed last is the newest: {:?} then {:?}",
        later.created_at,
        earlier.created_at
    );
    let balances = query::payer_balances(&client, payer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(balances, vec![(usd, 88 * MICROS_PER_UNIT as i128)]);
    let statement = query::payer_entries(&client, payer, 10, None)
        .await
        .unwrap()
        .unwrap();
    let newest = &statement.items[0];
    assert_eq!(newest.object, EntryObject::Payment(earlier.id));
    assert_eq!(newest.balance_after.micros(), 88 * MICROS_PER_UNIT);
    let listed = query::list_payments(&client, Principal::Merchant(merchant), 10, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        listed.items.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![earlier.id, later.id]
    );
}

/// A prune forgets keys by their age with one `DELETE`, without reading them, and a batch that
/// presents an expired key after the prune treats it as new, as the whole state does.
#[tokio::test]
async fn a_prune_forgets_old_keys_by_age_and_an_expired_key_used_again_is_new() {
    let Some(db) = TestDatabase::create("a_prune_forgets_old_keys_by_age").await else {
        return;
    };
    let mut client = db.migrated().await;
    let usd = farthing_ledger::Currency::parse("USD").unwrap();
    let mut state = State::new();
    let mut both = async |state: &mut State, records: Vec<Record>| {
        let expected: Vec<Outcome> = records.iter().map(|r| state.apply(r)).collect();
        let got = apply_batch(&mut client, &records).await.unwrap();
        assert_eq!(got, expected);
        got
    };
    let (setup, merchant, payer) = shop_and_payer(100);
    both(&mut state, setup).await;
    let claim = |name: &str| IdempotencyClaim {
        key: IdempotencyKey {
            principal: Principal::Payer(payer),
            key: name.to_string(),
        },
        fingerprint: [7; 32],
    };
    let pay = |n: u128, now: u64, key: &str| Record {
        now: Timestamp(now),
        idempotency: Some(claim(key)),
        command: Command::Pay(PayCommand {
            id: PaymentId::from_u128(100 + n),
            payer,
            merchant,
            amount: Amount::from_micros(MICROS_PER_UNIT),
            currency: usd,
            description: None,
            reference: None,
            transfer_ids: [TransferId(1_000 + 2 * n), TransferId(1_001 + 2 * n)],
        }),
    };
    for (n, key) in ["k1", "k2", "k3"].into_iter().enumerate() {
        both(
            &mut state,
            vec![pay(n as u128, T + 10 * (n as u64 + 1), key)],
        )
        .await;
    }
    // Cut between k2 and k3, then use k1 again in the same batch: it is a new request.
    let outcomes = both(
        &mut state,
        vec![
            record(
                T + 100,
                Command::PruneIdempotencyKeys {
                    before: Timestamp(T + 25),
                },
            ),
            pay(9, T + 100, "k1"),
        ],
    )
    .await;
    assert_eq!(outcomes[0], Outcome::Pruned);
    assert!(matches!(&outcomes[1], Outcome::Paid(p) if p.id == PaymentId::from_u128(109)));
    for (key, kept) in [("k1", true), ("k2", false), ("k3", true)] {
        let stored = query::idempotency(&client, &claim(key).key).await.unwrap();
        assert_eq!(stored.is_some(), kept, "{key}");
    }
}
