//! Batches commit in the order their accounts' locks are granted, which need not be the order
//! of their times: two servers' clocks differ, and a batch that took its time first may wait
//! for another's locks. Lists are ordered by time, so a batch that touches an account must be
//! given a time later than any earlier change to that account, or a statement would show a
//! running balance that is not the newest.

mod common;

use common::TestDatabase;
use farthing_ledger::{Amount, MICROS_PER_UNIT, Timestamp, TransferId};
use farthing_payments::*;
use farthing_store_postgres::{apply_batch, connect, migrate, query};

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
    let mut client = connect(&db.url).await.unwrap();
    migrate(&mut client).await.unwrap();
    let usd = farthing_ledger::Currency::parse("USD").unwrap();
    let (merchant, payer) = (MerchantId::from_u128(1), PayerId::from_u128(2));
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
    let setup = [
        record(
            T,
            Command::CreateMerchant {
                id: merchant,
                name: "Shop".into(),
                key_hash: KeyHash([1; 32]),
                fee: FeeSchedule::ZERO,
            },
        ),
        record(
            T,
            Command::CreatePayer {
                id: payer,
                name: "Ada".into(),
                key_hash: KeyHash([2; 32]),
            },
        ),
        record(
            T,
            Command::Topup {
                id: TopupId::from_u128(3),
                payer,
                amount: Amount::from_micros(100 * MICROS_PER_UNIT),
                currency: usd,
                source: FundingSource::Sandbox,
                transfer_id: TransferId(3),
            },
        ),
    ];
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
