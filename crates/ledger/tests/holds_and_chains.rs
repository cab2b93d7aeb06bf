//! Holds, linked chains and idempotency, one scenario per test.
//!
//! Expected balances are worked out by hand from the scenario, never copied from a run.

use TransferRejection::*;
use farthing_ledger::*;

const FUNDING: AccountId = AccountId(1);
const WALLET: AccountId = AccountId(2);
const MERCHANT: AccountId = AccountId(3);
const FEES: AccountId = AccountId(4);
const EUR_FUNDING: AccountId = AccountId(5);
const EUR_WALLET: AccountId = AccountId(6);
const NOBODY: AccountId = AccountId(99);

/// The id of the top-up that opens every scenario.
const TOP_UP: TransferId = TransferId(1_000);
/// The balance the wallet starts with.
const START: u64 = 1_000;

fn usd() -> Currency {
    Currency::parse("USD").unwrap()
}

fn eur() -> Currency {
    Currency::parse("EUR").unwrap()
}

fn secs(secs: u64) -> Timestamp {
    Timestamp(secs * 1_000_000)
}

fn transfer(
    id: u128,
    debit: AccountId,
    credit: AccountId,
    micros: u64,
    kind: TransferKind,
) -> Transfer {
    Transfer {
        id: TransferId(id),
        debit,
        credit,
        amount: Amount::from_micros(micros),
        kind,
        linked: false,
    }
}

fn posted(id: u128, debit: AccountId, credit: AccountId, micros: u64) -> Transfer {
    transfer(id, debit, credit, micros, TransferKind::Posted)
}

fn pending(
    id: u128,
    debit: AccountId,
    credit: AccountId,
    micros: u64,
    timeout_secs: u32,
) -> Transfer {
    transfer(
        id,
        debit,
        credit,
        micros,
        TransferKind::Pending { timeout_secs },
    )
}

/// Posts hold `pending_id` (wallet to merchant); `micros == 0` posts it in full.
fn post(id: u128, pending_id: u128, micros: u64) -> Transfer {
    transfer(
        id,
        WALLET,
        MERCHANT,
        micros,
        TransferKind::PostPending {
            pending_id: TransferId(pending_id),
        },
    )
}

/// Voids hold `pending_id` (wallet to merchant).
fn void(id: u128, pending_id: u128) -> Transfer {
    transfer(
        id,
        WALLET,
        MERCHANT,
        0,
        TransferKind::VoidPending {
            pending_id: TransferId(pending_id),
        },
    )
}

fn linked(mut transfer: Transfer) -> Transfer {
    transfer.linked = true;
    transfer
}

/// A ledger whose wallet holds `START` micro-dollars, topped up at t = 0.
fn ledger() -> Ledger {
    let mut ledger = Ledger::new();
    ledger
        .create_account(FUNDING, AccountKind::ExternalFunding, usd())
        .unwrap();
    ledger
        .create_account(WALLET, AccountKind::PayerWallet, usd())
        .unwrap();
    ledger
        .create_account(MERCHANT, AccountKind::Merchant, usd())
        .unwrap();
    ledger
        .create_account(FEES, AccountKind::PlatformFees, usd())
        .unwrap();
    ledger
        .create_account(EUR_FUNDING, AccountKind::ExternalFunding, eur())
        .unwrap();
    ledger
        .create_account(EUR_WALLET, AccountKind::PayerWallet, eur())
        .unwrap();
    let top_up = Transfer {
        id: TOP_UP,
        ..posted(0, FUNDING, WALLET, START)
    };
    assert_eq!(ledger.apply(secs(0), &[top_up]), vec![Ok(())]);
    ledger
}

fn account(ledger: &Ledger, id: AccountId) -> Account {
    *ledger.account(id).expect("the account exists")
}

fn hold_state(ledger: &Ledger, id: u128) -> Option<HoldState> {
    ledger
        .transfer(TransferId(id))
        .expect("the hold is recorded")
        .hold
}

fn outcome(ledger: &Ledger, id: u128) -> Result<(), TransferRejection> {
    ledger
        .transfer(TransferId(id))
        .expect("the id is recorded")
        .outcome
}

/// Every account, by id, for before/after comparisons.
fn accounts(ledger: &Ledger) -> Vec<Account> {
    let mut accounts: Vec<Account> = ledger.accounts().copied().collect();
    accounts.sort_by_key(|account| account.id);
    accounts
}

// ---------------------------------------------------------------------------------------------
// Holds
// ---------------------------------------------------------------------------------------------

#[test]
fn a_pending_transfer_reserves_available_balance_without_moving_posted_money() {
    let mut ledger = ledger();
    assert_eq!(
        ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]),
        vec![Ok(())]
    );

    let wallet = account(&ledger, WALLET);
    assert_eq!(wallet.posted_balance(), START as i128);
    assert_eq!(wallet.debits_pending, 300);
    assert_eq!(wallet.available(), START as i128 - 300);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!(merchant.credits_pending, 300);
    assert_eq!(merchant.posted_balance(), 0);
    assert_eq!(merchant.available(), 0);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
    assert_eq!(ledger.transfer(TransferId(1)).unwrap().expires_at, None);
}

#[test]
fn posting_a_hold_with_amount_zero_posts_it_in_full() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    assert_eq!(ledger.apply(secs(2), &[post(2, 1, 0)]), vec![Ok(())]);

    let wallet = account(&ledger, WALLET);
    assert_eq!((wallet.debits_posted, wallet.debits_pending), (300, 0));
    assert_eq!(wallet.available(), START as i128 - 300);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!(
        (merchant.credits_posted, merchant.credits_pending),
        (300, 0)
    );
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
    assert_eq!(outcome(&ledger, 2), Ok(()));
}

#[test]
fn posting_a_hold_with_its_exact_amount_posts_it_in_full() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    assert_eq!(ledger.apply(secs(2), &[post(2, 1, 300)]), vec![Ok(())]);

    assert_eq!(account(&ledger, WALLET).debits_posted, 300);
    assert_eq!(account(&ledger, WALLET).debits_pending, 0);
    assert_eq!(account(&ledger, MERCHANT).credits_posted, 300);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
}

#[test]
fn posting_part_of_a_hold_moves_that_part_and_releases_the_rest() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    assert_eq!(ledger.apply(secs(2), &[post(2, 1, 120)]), vec![Ok(())]);

    let wallet = account(&ledger, WALLET);
    assert_eq!((wallet.debits_posted, wallet.debits_pending), (120, 0));
    assert_eq!(wallet.available(), START as i128 - 120);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!(
        (merchant.credits_posted, merchant.credits_pending),
        (120, 0)
    );
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
}

#[test]
fn posting_more_than_a_hold_is_rejected_and_keeps_the_hold() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    let before = accounts(&ledger);
    assert_eq!(
        ledger.apply(secs(2), &[post(2, 1, 301)]),
        vec![Err(ExceedsPendingAmount)]
    );

    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
    // The hold is still usable.
    assert_eq!(ledger.apply(secs(3), &[post(3, 1, 300)]), vec![Ok(())]);
}

#[test]
fn voiding_a_hold_releases_it_and_moves_nothing() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    assert_eq!(ledger.apply(secs(2), &[void(2, 1)]), vec![Ok(())]);

    let wallet = account(&ledger, WALLET);
    assert_eq!((wallet.debits_posted, wallet.debits_pending), (0, 0));
    assert_eq!(wallet.available(), START as i128);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!((merchant.credits_posted, merchant.credits_pending), (0, 0));
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Voided));
}

#[test]
fn posting_a_hold_twice_is_rejected_as_already_posted() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    ledger.apply(secs(2), &[post(2, 1, 100)]);
    let before = accounts(&ledger);

    assert_eq!(
        ledger.apply(secs(3), &[post(3, 1, 100)]),
        vec![Err(PendingTransferAlreadyPosted)]
    );
    assert_eq!(
        ledger.apply(secs(3), &[void(4, 1)]),
        vec![Err(PendingTransferAlreadyPosted)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
}

#[test]
fn posting_a_hold_twice_in_one_batch_is_rejected_as_already_posted() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    assert_eq!(
        ledger.apply(secs(2), &[post(2, 1, 0), post(3, 1, 0)]),
        vec![Ok(()), Err(PendingTransferAlreadyPosted)]
    );
    assert_eq!(account(&ledger, WALLET).debits_posted, 300);
    assert_eq!(account(&ledger, MERCHANT).credits_posted, 300);
}

#[test]
fn posting_or_voiding_after_a_void_is_rejected_as_already_voided() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 60)]);
    ledger.apply(secs(2), &[void(2, 1)]);
    let before = accounts(&ledger);

    assert_eq!(
        ledger.apply(secs(3), &[post(3, 1, 0)]),
        vec![Err(PendingTransferAlreadyVoided)]
    );
    assert_eq!(
        ledger.apply(secs(3), &[void(4, 1)]),
        vec![Err(PendingTransferAlreadyVoided)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Voided));
}

#[test]
fn a_hold_expires_exactly_when_its_timeout_has_elapsed_and_then_cannot_be_posted() {
    let mut ledger = ledger();
    // Created at 10 s with a 30 s timeout: it expires at 40 s.
    ledger.apply(secs(10), &[pending(1, WALLET, MERCHANT, 300, 30)]);
    assert_eq!(
        ledger.transfer(TransferId(1)).unwrap().expires_at,
        Some(secs(40))
    );

    ledger.apply(Timestamp(secs(40).0 - 1), &[]);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
    assert_eq!(account(&ledger, WALLET).debits_pending, 300);
    assert_eq!(account(&ledger, MERCHANT).credits_pending, 300);

    ledger.apply(secs(40), &[]);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Expired));
    let wallet = account(&ledger, WALLET);
    assert_eq!((wallet.debits_posted, wallet.debits_pending), (0, 0));
    assert_eq!(wallet.available(), START as i128);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!((merchant.credits_posted, merchant.credits_pending), (0, 0));

    let before = accounts(&ledger);
    assert_eq!(
        ledger.apply(secs(41), &[post(2, 1, 0)]),
        vec![Err(PendingTransferExpired)]
    );
    assert_eq!(
        ledger.apply(secs(41), &[void(3, 1)]),
        vec![Err(PendingTransferExpired)]
    );
    assert_eq!(accounts(&ledger), before);
}

#[test]
fn a_post_in_the_batch_that_reaches_the_deadline_finds_the_hold_expired() {
    let mut ledger = ledger();
    ledger.apply(secs(10), &[pending(1, WALLET, MERCHANT, 300, 30)]);
    assert_eq!(
        ledger.apply(secs(40), &[post(2, 1, 0)]),
        vec![Err(PendingTransferExpired)]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128);
    assert_eq!(account(&ledger, MERCHANT).credits_posted, 0);
}

#[test]
fn a_post_one_microsecond_before_the_deadline_succeeds() {
    let mut ledger = ledger();
    ledger.apply(secs(10), &[pending(1, WALLET, MERCHANT, 300, 30)]);
    assert_eq!(
        ledger.apply(Timestamp(secs(40).0 - 1), &[post(2, 1, 0)]),
        vec![Ok(())]
    );
    assert_eq!(account(&ledger, MERCHANT).credits_posted, 300);
}

#[test]
fn a_hold_resolved_before_its_deadline_is_not_released_again_at_the_deadline() {
    let mut ledger = ledger();
    ledger.apply(
        secs(10),
        &[
            pending(1, WALLET, MERCHANT, 300, 30),
            pending(2, WALLET, MERCHANT, 200, 30),
        ],
    );
    ledger.apply(secs(11), &[post(3, 1, 100), void(4, 2)]);
    let before = accounts(&ledger);

    ledger.apply(secs(100), &[]);
    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
    assert_eq!(hold_state(&ledger, 2), Some(HoldState::Voided));
}

#[test]
fn a_hold_with_zero_timeout_never_expires() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    ledger.apply(secs(10_000_000_000), &[]);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
    assert_eq!(account(&ledger, WALLET).debits_pending, 300);
    assert_eq!(
        ledger.apply(secs(10_000_000_001), &[post(2, 1, 0)]),
        vec![Ok(())]
    );
}

#[test]
fn a_hold_on_a_wallet_cannot_exceed_its_available_balance() {
    let mut ledger = ledger();
    assert_eq!(
        ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 700, 0)]),
        vec![Ok(())]
    );
    let before = accounts(&ledger);
    // 300 remain available: one micro more is refused, whether held or posted.
    assert_eq!(
        ledger.apply(
            secs(2),
            &[
                pending(2, WALLET, MERCHANT, 301, 0),
                posted(3, WALLET, MERCHANT, 301)
            ]
        ),
        vec![Err(ExceedsAvailableBalance), Err(ExceedsAvailableBalance)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(
        ledger.apply(secs(3), &[pending(4, WALLET, MERCHANT, 300, 0)]),
        vec![Ok(())]
    );
    assert_eq!(account(&ledger, WALLET).available(), 0);
    assert_eq!(
        ledger.apply(secs(4), &[posted(5, WALLET, MERCHANT, 1)]),
        vec![Err(ExceedsAvailableBalance)]
    );
}

#[test]
fn a_hold_larger_than_the_whole_wallet_is_refused_even_with_nothing_held() {
    let mut ledger = ledger();
    assert_eq!(
        ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, START + 1, 0)]),
        vec![Err(ExceedsAvailableBalance)]
    );
    assert_eq!(account(&ledger, WALLET).debits_pending, 0);
    assert_eq!(account(&ledger, MERCHANT).credits_pending, 0);
}

#[test]
fn money_held_for_a_merchant_cannot_be_spent_by_the_merchant_before_it_is_posted() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    assert_eq!(
        ledger.apply(secs(2), &[posted(2, MERCHANT, FEES, 1)]),
        vec![Err(ExceedsAvailableBalance)]
    );
    ledger.apply(secs(3), &[post(3, 1, 0)]);
    assert_eq!(
        ledger.apply(secs(4), &[posted(4, MERCHANT, FEES, 300)]),
        vec![Ok(())]
    );
    assert_eq!(account(&ledger, MERCHANT).available(), 0);
    assert_eq!(account(&ledger, FEES).available(), 300);
}

#[test]
fn an_external_funding_account_may_go_negative_but_a_wallet_may_not() {
    let mut ledger = ledger();
    assert_eq!(account(&ledger, FUNDING).available(), -(START as i128));
    assert_eq!(
        ledger.apply(secs(1), &[posted(1, WALLET, MERCHANT, START + 1)]),
        vec![Err(ExceedsAvailableBalance)]
    );
    assert_eq!(
        ledger.apply(secs(1), &[posted(2, FUNDING, MERCHANT, 5)]),
        vec![Ok(())]
    );
    assert_eq!(account(&ledger, FUNDING).available(), -(START as i128) - 5);
}

#[test]
fn a_post_or_void_naming_other_accounts_than_its_hold_is_rejected() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    let before = accounts(&ledger);
    let wrong_credit = Transfer {
        credit: FEES,
        ..post(2, 1, 0)
    };
    let swapped = Transfer {
        debit: MERCHANT,
        credit: WALLET,
        ..void(3, 1)
    };
    assert_eq!(
        ledger.apply(secs(2), &[wrong_credit, swapped]),
        vec![
            Err(PendingTransferHasDifferentAccounts),
            Err(PendingTransferHasDifferentAccounts)
        ]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
}

#[test]
fn posting_something_that_is_not_an_applied_hold_is_rejected_as_not_found() {
    let mut ledger = ledger();
    // 3 is a refused hold, TOP_UP is a posted transfer, 77 was never seen.
    ledger.apply(secs(1), &[pending(3, WALLET, MERCHANT, START + 1, 0)]);
    let top_up_post = Transfer {
        debit: FUNDING,
        credit: WALLET,
        ..post(4, TOP_UP.0, 0)
    };
    assert_eq!(
        ledger.apply(secs(2), &[post(1, 77, 0), post(2, 3, 0), top_up_post]),
        vec![
            Err(PendingTransferNotFound),
            Err(PendingTransferNotFound),
            Err(PendingTransferNotFound)
        ]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128);
}

// ---------------------------------------------------------------------------------------------
// Linked chains
// ---------------------------------------------------------------------------------------------

#[test]
fn a_linked_chain_that_succeeds_applies_every_member() {
    let mut ledger = ledger();
    let chain = [
        linked(posted(1, WALLET, MERCHANT, 400)),
        linked(posted(2, MERCHANT, FEES, 40)),
        pending(3, WALLET, MERCHANT, 100, 0),
    ];
    assert_eq!(ledger.apply(secs(1), &chain), vec![Ok(()), Ok(()), Ok(())]);
    assert_eq!(account(&ledger, WALLET).available(), START as i128 - 500);
    assert_eq!(account(&ledger, MERCHANT).posted_balance(), 360);
    assert_eq!(account(&ledger, FEES).posted_balance(), 40);
    assert_eq!(hold_state(&ledger, 3), Some(HoldState::Pending));
}

#[test]
fn a_rejected_linked_chain_changes_nothing() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(10, WALLET, MERCHANT, 100, 0)]);
    let accounts_before = accounts(&ledger);
    let hold_before = *ledger.transfer(TransferId(10)).unwrap();

    // Each of the first three would succeed alone; the fourth overdraws the wallet.
    let chain = [
        linked(posted(1, WALLET, MERCHANT, 200)),
        linked(pending(2, WALLET, FEES, 100, 30)),
        linked(post(3, 10, 0)),
        posted(4, WALLET, MERCHANT, START),
    ];
    assert_eq!(
        ledger.apply(secs(2), &chain),
        vec![
            Err(LinkedEventFailed),
            Err(LinkedEventFailed),
            Err(LinkedEventFailed),
            Err(ExceedsAvailableBalance)
        ]
    );
    assert_eq!(accounts(&ledger), accounts_before);
    assert_eq!(*ledger.transfer(TransferId(10)).unwrap(), hold_before);
    // The members' ids are spent on their failures.
    assert_eq!(outcome(&ledger, 1), Err(LinkedEventFailed));
    assert_eq!(outcome(&ledger, 2), Err(LinkedEventFailed));
    assert_eq!(ledger.transfer(TransferId(2)).unwrap().hold, None);
    assert_eq!(outcome(&ledger, 3), Err(LinkedEventFailed));
    assert_eq!(outcome(&ledger, 4), Err(ExceedsAvailableBalance));
    // The hold the chain did not create does not expire in its place either.
    ledger.apply(secs(1_000), &[]);
    assert_eq!(accounts(&ledger), accounts_before);
    assert_eq!(ledger.apply(secs(1_001), &[post(5, 10, 0)]), vec![Ok(())]);
}

#[test]
fn the_members_after_the_culprit_of_a_chain_are_rejected_as_linked_event_failed() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    let chain = [
        linked(posted(1, WALLET, MERCHANT, 10)),
        linked(posted(2, WALLET, NOBODY, 10)),
        linked(posted(3, WALLET, MERCHANT, 10)),
        posted(4, WALLET, MERCHANT, 10),
    ];
    assert_eq!(
        ledger.apply(secs(1), &chain),
        vec![
            Err(LinkedEventFailed),
            Err(CreditAccountNotFound),
            Err(LinkedEventFailed),
            Err(LinkedEventFailed)
        ]
    );
    assert_eq!(accounts(&ledger), before);
}

#[test]
fn a_batch_that_ends_inside_a_linked_chain_rejects_the_whole_chain_as_open() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    assert_eq!(
        ledger.apply(
            secs(1),
            &[
                posted(1, WALLET, MERCHANT, 10),
                linked(posted(2, WALLET, MERCHANT, 20)),
                linked(posted(3, WALLET, MERCHANT, 30)),
            ]
        ),
        vec![Ok(()), Err(LinkedEventFailed), Err(LinkedEventChainOpen)]
    );
    let mut expected = before.clone();
    expected[1].debits_posted += 10; // WALLET
    expected[2].credits_posted += 10; // MERCHANT
    assert_eq!(accounts(&ledger), expected);

    assert_eq!(
        ledger.apply(secs(2), &[linked(posted(4, WALLET, MERCHANT, 10))]),
        vec![Err(LinkedEventChainOpen)]
    );
    assert_eq!(accounts(&ledger), expected);
}

#[test]
fn a_transfer_after_a_rejected_chain_is_judged_on_its_own() {
    let mut ledger = ledger();
    let batch = [
        linked(posted(1, WALLET, MERCHANT, 10)),
        posted(2, WALLET, MERCHANT, START + 1),
        posted(3, WALLET, MERCHANT, 100),
        posted(4, WALLET, FEES, 50),
    ];
    assert_eq!(
        ledger.apply(secs(1), &batch),
        vec![
            Err(LinkedEventFailed),
            Err(ExceedsAvailableBalance),
            Ok(()),
            Ok(())
        ]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128 - 150);
    assert_eq!(account(&ledger, MERCHANT).posted_balance(), 100);
    assert_eq!(account(&ledger, FEES).posted_balance(), 50);
}

#[test]
fn a_chain_after_a_rejected_chain_in_the_same_batch_can_succeed() {
    let mut ledger = ledger();
    let batch = [
        linked(posted(1, WALLET, NOBODY, 10)),
        posted(2, WALLET, MERCHANT, 10),
        linked(posted(3, WALLET, MERCHANT, 100)),
        posted(4, MERCHANT, FEES, 10),
    ];
    assert_eq!(
        ledger.apply(secs(1), &batch),
        vec![
            Err(CreditAccountNotFound),
            Err(LinkedEventFailed),
            Ok(()),
            Ok(())
        ]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128 - 100);
    assert_eq!(account(&ledger, MERCHANT).posted_balance(), 90);
    assert_eq!(account(&ledger, FEES).posted_balance(), 10);
}

#[test]
fn a_rejected_chain_that_created_and_posted_a_hold_leaves_no_hold_behind() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    let chain = [
        linked(pending(1, WALLET, MERCHANT, 300, 5)),
        linked(post(2, 1, 100)),
        posted(3, WALLET, MERCHANT, START),
    ];
    assert_eq!(
        ledger.apply(secs(1), &chain),
        vec![
            Err(LinkedEventFailed),
            Err(LinkedEventFailed),
            Err(ExceedsAvailableBalance)
        ]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(ledger.transfer(TransferId(1)).unwrap().hold, None);
    // Its deadline passes without touching anything, and it cannot be posted.
    ledger.apply(secs(10), &[]);
    assert_eq!(accounts(&ledger), before);
    assert_eq!(
        ledger.apply(secs(11), &[post(4, 1, 0)]),
        vec![Err(PendingTransferNotFound)]
    );
}

#[test]
fn a_rejected_chain_that_voided_a_hold_leaves_the_hold_pending() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    let before = accounts(&ledger);
    // With the hold voided the whole START is available, one micro more is not.
    assert_eq!(
        ledger.apply(
            secs(2),
            &[linked(void(2, 1)), posted(3, WALLET, MERCHANT, START + 1)]
        ),
        vec![Err(LinkedEventFailed), Err(ExceedsAvailableBalance)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
}

#[test]
fn an_exact_retry_inside_a_rejected_chain_keeps_its_first_record_and_effect() {
    let mut ledger = ledger();
    let member = linked(posted(1, WALLET, MERCHANT, 100));
    assert_eq!(
        ledger.apply(secs(1), &[member, posted(2, WALLET, FEES, 5)]),
        vec![Ok(()), Ok(())]
    );
    let before = accounts(&ledger);
    let first = *ledger.transfer(TransferId(1)).unwrap();

    // The retry of 1 is a no-op inside the chain; rolling the chain back must not undo it.
    assert_eq!(
        ledger.apply(secs(2), &[member, posted(3, WALLET, NOBODY, 1)]),
        vec![Err(LinkedEventFailed), Err(CreditAccountNotFound)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(*ledger.transfer(TransferId(1)).unwrap(), first);
    assert_eq!(account(&ledger, WALLET).available(), START as i128 - 105);
}

#[test]
fn a_chain_member_repeated_inside_its_rejected_chain_is_rolled_back_once() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    let member = linked(posted(1, WALLET, MERCHANT, 100));
    assert_eq!(
        ledger.apply(secs(1), &[member, member, posted(2, WALLET, NOBODY, 1)]),
        vec![
            Err(LinkedEventFailed),
            Err(LinkedEventFailed),
            Err(CreditAccountNotFound)
        ]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(outcome(&ledger, 1), Err(LinkedEventFailed));
}

// ---------------------------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------------------------

#[test]
fn a_retried_transfer_returns_its_first_outcome_and_changes_nothing() {
    let mut ledger = ledger();
    let payment = posted(1, WALLET, MERCHANT, 100);
    assert_eq!(ledger.apply(secs(1), &[payment]), vec![Ok(())]);
    let before = accounts(&ledger);
    let record = *ledger.transfer(TransferId(1)).unwrap();

    assert_eq!(
        ledger.apply(secs(2), &[payment, payment]),
        vec![Ok(()), Ok(())]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(*ledger.transfer(TransferId(1)).unwrap(), record);
    assert_eq!(record.timestamp, secs(1));
}

#[test]
fn a_retried_hold_post_returns_ok_and_does_not_post_again() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    assert_eq!(ledger.apply(secs(2), &[post(2, 1, 100)]), vec![Ok(())]);
    let before = accounts(&ledger);
    assert_eq!(ledger.apply(secs(3), &[post(2, 1, 100)]), vec![Ok(())]);
    assert_eq!(accounts(&ledger), before);
}

#[test]
fn a_failed_transfer_stays_failed_after_a_top_up() {
    let mut ledger = ledger();
    let payment = posted(1, WALLET, MERCHANT, START + 500);
    assert_eq!(
        ledger.apply(secs(1), &[payment]),
        vec![Err(ExceedsAvailableBalance)]
    );
    assert_eq!(
        ledger.apply(secs(2), &[posted(2, FUNDING, WALLET, 1_000)]),
        vec![Ok(())]
    );
    let before = accounts(&ledger);

    assert_eq!(
        ledger.apply(secs(3), &[payment]),
        vec![Err(ExceedsAvailableBalance)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(ledger.transfer(TransferId(1)).unwrap().timestamp, secs(1));
}

#[test]
fn a_failed_transfer_retried_later_in_the_same_batch_stays_failed() {
    let mut ledger = ledger();
    let payment = posted(1, WALLET, MERCHANT, START + 500);
    let top_up = posted(2, FUNDING, WALLET, 1_000);
    assert_eq!(
        ledger.apply(secs(1), &[payment, top_up, payment]),
        vec![
            Err(ExceedsAvailableBalance),
            Ok(()),
            Err(ExceedsAvailableBalance)
        ]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128 + 1_000);
    assert_eq!(account(&ledger, MERCHANT).posted_balance(), 0);
    assert_eq!(outcome(&ledger, 1), Err(ExceedsAvailableBalance));
}

#[test]
fn a_chain_member_that_failed_stays_failed_when_retried_later_in_the_same_batch() {
    let mut ledger = ledger();
    let member = linked(posted(1, WALLET, MERCHANT, 100));
    let retry_chain_end = posted(3, WALLET, MERCHANT, 1);
    assert_eq!(
        ledger.apply(
            secs(1),
            &[
                member,
                posted(2, WALLET, NOBODY, 1),
                member,
                retry_chain_end
            ]
        ),
        vec![
            Err(LinkedEventFailed),
            Err(CreditAccountNotFound),
            Err(LinkedEventFailed),
            Err(LinkedEventFailed)
        ]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128);
    assert_eq!(outcome(&ledger, 1), Err(LinkedEventFailed));
    assert_eq!(outcome(&ledger, 3), Err(LinkedEventFailed));
}

#[test]
fn reusing_an_id_with_different_fields_is_rejected_and_keeps_the_first_record() {
    let mut ledger = ledger();
    let payment = posted(1, WALLET, MERCHANT, 100);
    ledger.apply(secs(1), &[payment]);
    let before = accounts(&ledger);
    let record = *ledger.transfer(TransferId(1)).unwrap();

    let variants = [
        Transfer {
            amount: Amount::from_micros(101),
            ..payment
        },
        Transfer {
            credit: FEES,
            ..payment
        },
        Transfer {
            kind: TransferKind::Pending { timeout_secs: 0 },
            ..payment
        },
    ];
    for variant in variants {
        assert_eq!(
            ledger.apply(secs(2), &[variant]),
            vec![Err(ExistsWithDifferentFields)],
            "{variant:?}"
        );
    }
    // Only the flag differs: still different fields, and the chain it opens fails with it.
    assert_eq!(
        ledger.apply(secs(2), &[linked(payment), posted(2, WALLET, FEES, 1)]),
        vec![Err(ExistsWithDifferentFields), Err(LinkedEventFailed)]
    );
    assert_eq!(accounts(&ledger), before);
    assert_eq!(*ledger.transfer(TransferId(1)).unwrap(), record);
}

#[test]
fn an_id_that_failed_earlier_in_the_batch_cannot_be_reused_with_different_fields() {
    let mut ledger = ledger();
    let too_big = posted(1, WALLET, MERCHANT, START + 1);
    let smaller = Transfer {
        amount: Amount::from_micros(10),
        ..too_big
    };
    assert_eq!(
        ledger.apply(secs(1), &[too_big, smaller]),
        vec![Err(ExceedsAvailableBalance), Err(ExistsWithDifferentFields)]
    );
    assert_eq!(account(&ledger, WALLET).available(), START as i128);
    assert_eq!(ledger.transfer(TransferId(1)).unwrap().transfer, too_big);
}

#[test]
fn invalid_transfers_are_rejected_with_their_reason_and_change_nothing() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    let batch = [
        posted(0, WALLET, MERCHANT, 1),
        posted(1, WALLET, WALLET, 1),
        posted(2, WALLET, MERCHANT, 0),
        pending(3, WALLET, MERCHANT, 0, 0),
        posted(4, NOBODY, MERCHANT, 1),
        posted(5, WALLET, NOBODY, 1),
        posted(6, EUR_WALLET, WALLET, 1),
        posted(7, FUNDING, EUR_WALLET, 1),
    ];
    assert_eq!(
        ledger.apply(secs(1), &batch),
        vec![
            Err(IdMustNotBeZero),
            Err(AccountsMustBeDifferent),
            Err(AmountMustNotBeZero),
            Err(AmountMustNotBeZero),
            Err(DebitAccountNotFound),
            Err(CreditAccountNotFound),
            Err(CurrenciesMustMatch),
            Err(CurrenciesMustMatch)
        ]
    );
    assert_eq!(accounts(&ledger), before);
    // Id zero is never recorded; the others are spent on their failures.
    assert!(ledger.transfer(TransferId(0)).is_none());
    assert_eq!(outcome(&ledger, 1), Err(AccountsMustBeDifferent));
    assert_eq!(outcome(&ledger, 7), Err(CurrenciesMustMatch));
}

#[test]
fn a_total_that_would_overflow_is_rejected_and_changes_nothing() {
    let mut ledger = ledger();
    let before = accounts(&ledger);
    // FUNDING has already paid out START, so its debits cannot take TOTAL_MICROS_MAX more.
    let huge = posted(1, FUNDING, MERCHANT, TOTAL_MICROS_MAX);
    assert_eq!(ledger.apply(secs(1), &[huge]), vec![Err(Overflow)]);
    assert_eq!(accounts(&ledger), before);
    assert_eq!(
        ledger.apply(
            secs(2),
            &[posted(2, EUR_FUNDING, EUR_WALLET, TOTAL_MICROS_MAX)]
        ),
        vec![Ok(())]
    );
    assert_eq!(
        ledger.apply(secs(3), &[pending(3, EUR_FUNDING, EUR_WALLET, 1, 0)]),
        vec![Ok(())]
    );
    assert_eq!(
        ledger.apply(secs(4), &[posted(4, EUR_FUNDING, EUR_WALLET, 1)]),
        vec![Err(Overflow)]
    );
    let eur_wallet = account(&ledger, EUR_WALLET);
    assert_eq!(
        (eur_wallet.credits_posted, eur_wallet.credits_pending),
        (TOTAL_MICROS_MAX, 1)
    );
    assert_eq!(accounts(&ledger)[..4], before[..4]);
}

#[test]
fn creating_an_account_again_is_a_no_op_and_conflicting_fields_are_rejected() {
    let mut ledger = ledger();
    assert_eq!(
        ledger.create_account(WALLET, AccountKind::PayerWallet, usd()),
        Ok(())
    );
    assert_eq!(account(&ledger, WALLET).credits_posted, START);
    assert_eq!(
        ledger.create_account(WALLET, AccountKind::Merchant, usd()),
        Err(AccountRejection::ExistsWithDifferentFields)
    );
    assert_eq!(
        ledger.create_account(WALLET, AccountKind::PayerWallet, eur()),
        Err(AccountRejection::ExistsWithDifferentFields)
    );
    assert_eq!(
        ledger.create_account(AccountId(0), AccountKind::PayerWallet, usd()),
        Err(AccountRejection::IdMustNotBeZero)
    );
    assert_eq!(ledger.account_count(), 6);
}

// =============================================================================================
// Expiring a hold whose deadline is kept outside the ledger, and the holds a store must write
// =============================================================================================

#[test]
fn a_hold_expired_by_hand_is_released_with_no_transfer_and_then_cannot_be_posted() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    let transfers = ledger.transfer_count();

    assert_eq!(ledger.expire_pending(TransferId(1)), Ok(()));
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Expired));
    assert_eq!(ledger.transfer_count(), transfers, "no transfer of its own");
    let wallet = account(&ledger, WALLET);
    assert_eq!((wallet.debits_posted, wallet.debits_pending), (0, 0));
    assert_eq!(wallet.available(), START as i128);
    let merchant = account(&ledger, MERCHANT);
    assert_eq!((merchant.credits_posted, merchant.credits_pending), (0, 0));

    let before = accounts(&ledger);
    assert_eq!(
        ledger.apply(secs(2), &[post(2, 1, 0)]),
        vec![Err(PendingTransferExpired)]
    );
    assert_eq!(
        ledger.expire_pending(TransferId(1)),
        Err(PendingTransferExpired)
    );
    assert_eq!(accounts(&ledger), before);
}

#[test]
fn only_a_pending_hold_expires_by_hand() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    ledger.apply(secs(1), &[pending(2, WALLET, MERCHANT, 200, 0)]);
    ledger.apply(secs(2), &[post(3, 1, 0), void(4, 2)]);
    let before = accounts(&ledger);
    assert_eq!(
        ledger.expire_pending(TransferId(1)),
        Err(PendingTransferAlreadyPosted)
    );
    assert_eq!(
        ledger.expire_pending(TransferId(2)),
        Err(PendingTransferAlreadyVoided)
    );
    // A posted transfer is no hold, nor is an id never seen.
    assert_eq!(ledger.expire_pending(TOP_UP), Err(PendingTransferNotFound));
    assert_eq!(
        ledger.expire_pending(TransferId(99)),
        Err(PendingTransferNotFound)
    );
    assert_eq!(accounts(&ledger), before);
}

/// The ids of the holds whose state the ledger hands over as changed.
fn changed_holds(ledger: &mut Ledger) -> Vec<(TransferId, Option<HoldState>)> {
    ledger
        .take_hold_changes()
        .iter()
        .map(|record| (record.transfer.id, record.hold))
        .collect()
}

#[test]
fn the_holds_posted_voided_or_expired_are_handed_over_once_each() {
    let mut ledger = ledger();
    ledger.track_hold_changes();
    ledger.apply(
        secs(1),
        &[
            pending(1, WALLET, MERCHANT, 100, 0),
            pending(2, WALLET, MERCHANT, 100, 0),
            pending(3, WALLET, MERCHANT, 100, 0),
        ],
    );
    assert_eq!(changed_holds(&mut ledger), vec![], "placing is no change");
    ledger.apply(secs(2), &[post(4, 1, 50), void(5, 2)]);
    ledger.expire_pending(TransferId(3)).unwrap();
    assert_eq!(
        changed_holds(&mut ledger),
        vec![
            (TransferId(1), Some(HoldState::Posted)),
            (TransferId(2), Some(HoldState::Voided)),
            (TransferId(3), Some(HoldState::Expired)),
        ]
    );
    assert_eq!(changed_holds(&mut ledger), vec![], "handed over once");
}

#[test]
fn a_ledger_nobody_writes_back_keeps_no_hold_changes() {
    let mut ledger = ledger();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 100, 0)]);
    ledger.apply(secs(2), &[post(2, 1, 0)]);
    assert_eq!(changed_holds(&mut ledger), vec![]);
    // Tracked from here on: only what settles after.
    ledger.track_hold_changes();
    ledger.apply(secs(3), &[pending(3, WALLET, MERCHANT, 100, 0)]);
    ledger.apply(secs(4), &[void(4, 3)]);
    assert_eq!(
        changed_holds(&mut ledger),
        vec![(TransferId(3), Some(HoldState::Voided))]
    );
}

#[test]
fn a_hold_posted_by_a_chain_that_fails_is_no_change() {
    let mut ledger = ledger();
    ledger.track_hold_changes();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    // The post succeeds, then the chain fails on a leg the merchant cannot pay: both undone.
    assert_eq!(
        ledger.apply(
            secs(2),
            &[linked(post(2, 1, 0)), posted(3, MERCHANT, FEES, 301)]
        ),
        vec![Err(LinkedEventFailed), Err(ExceedsAvailableBalance)]
    );
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Pending));
    assert_eq!(changed_holds(&mut ledger), vec![]);
}

#[test]
fn a_loaded_hold_settled_since_the_last_hand_over_is_kept_until_handed_over() {
    // A cache's ledger: the hold's record was written to storage, and is held as loaded.
    let mut ledger = ledger();
    ledger.track_hold_changes();
    ledger.apply(secs(1), &[pending(1, WALLET, MERCHANT, 300, 0)]);
    let _written = ledger.take_made_transfers();
    ledger.apply(secs(2), &[post(2, 1, 0)]);
    // Storage holds the hold as pending: forgetting it now would lose its new state.
    ledger.forget_loaded_transfers();
    assert_eq!(hold_state(&ledger, 1), Some(HoldState::Posted));
    assert_eq!(
        changed_holds(&mut ledger),
        vec![(TransferId(1), Some(HoldState::Posted))]
    );
    ledger.forget_loaded_transfers();
    assert!(
        ledger.transfer(TransferId(1)).is_none(),
        "written, then let go"
    );
}

#[test]
fn ids_below_the_largest_recorded_are_found_whatever_order_they_came_in() {
    // New ids are usually larger than every id before them, and the ledger answers "absent"
    // for those without looking; every other id must still be found, made or loaded.
    let mut ledger = ledger();
    for id in [5_000, 2_000, 3_000] {
        assert_eq!(
            ledger.apply(secs(1), &[posted(id, WALLET, MERCHANT, 10)]),
            vec![Ok(())]
        );
    }
    for id in [1_000, 2_000, 3_000, 5_000] {
        assert_eq!(outcome(&ledger, id), Ok(()), "id {id}");
    }
    for id in [1, 2_500, 5_001, u128::MAX] {
        assert!(ledger.transfer(TransferId(id)).is_none(), "id {id}");
    }
    // A reused id below the largest is the same transfer again (no money moves) or refused.
    assert_eq!(
        ledger.apply(secs(2), &[posted(2_000, WALLET, MERCHANT, 10)]),
        vec![Ok(())]
    );
    assert_eq!(
        ledger.apply(secs(2), &[posted(2_000, WALLET, MERCHANT, 11)]),
        vec![Err(ExistsWithDifferentFields)]
    );
    assert_eq!(account(&ledger, WALLET).debits_posted, 30);

    // Handed over: the pending hold stays as a loaded record, the rest go, and the records
    // made from now on start from nothing, smaller ids included.
    assert_eq!(
        ledger.apply(secs(3), &[pending(1_500, WALLET, MERCHANT, 100, 0)]),
        vec![Ok(())]
    );
    let written = ledger.take_made_transfers();
    assert_eq!(written.len(), 5, "the top-up, three payments and the hold");
    assert!(ledger.transfer(TransferId(5_000)).is_none());
    assert_eq!(hold_state(&ledger, 1_500), Some(HoldState::Pending));
    assert_eq!(
        ledger.apply(secs(4), &[posted(900, WALLET, MERCHANT, 1)]),
        vec![Ok(())]
    );
    assert_eq!(outcome(&ledger, 900), Ok(()));
    assert_eq!(ledger.apply(secs(4), &[post(950, 1_500, 0)]), vec![Ok(())]);
    assert_eq!(hold_state(&ledger, 1_500), Some(HoldState::Posted));

    // A record loaded from storage with an id above every other is found too.
    let mut loaded = *ledger.transfer(TransferId(900)).unwrap();
    loaded.transfer.id = TransferId(9_000);
    ledger.insert_transfer_record(loaded).unwrap();
    assert_eq!(outcome(&ledger, 9_000), Ok(()));
    assert!(ledger.transfer(TransferId(9_001)).is_none());
}

// ---------------------------------------------------------------------------------------------
// Transfers applied without records
// ---------------------------------------------------------------------------------------------

#[test]
fn an_unrecorded_chain_moves_money_as_a_recorded_one_and_leaves_no_record() {
    let chain = [
        linked(posted(1, WALLET, MERCHANT, 360)),
        posted(2, WALLET, FEES, 40),
    ];
    let mut recorded = ledger();
    assert_eq!(recorded.apply(secs(1), &chain), vec![Ok(()), Ok(())]);
    let mut unrecorded = ledger();
    assert_eq!(
        unrecorded.apply_unrecorded(secs(1), &chain),
        vec![Ok(()), Ok(())]
    );
    assert_eq!(accounts(&unrecorded), accounts(&recorded));
    assert_eq!(account(&unrecorded, WALLET).posted_balance(), 600);
    assert!(unrecorded.transfer(TransferId(1)).is_none());
    assert!(unrecorded.transfer(TransferId(2)).is_none());
    // Only the top-up is kept.
    assert_eq!(unrecorded.transfer_count(), 1);
    assert_eq!(recorded.transfer_count(), 3);
}

#[test]
fn a_failed_unrecorded_chain_changes_nothing_and_spends_no_id() {
    let mut ledger = ledger();
    let accounts_before = accounts(&ledger);
    let chain = [
        linked(posted(1, WALLET, MERCHANT, 600)),
        posted(2, WALLET, FEES, 600),
    ];
    assert_eq!(
        ledger.apply_unrecorded(secs(1), &chain),
        vec![Err(LinkedEventFailed), Err(ExceedsAvailableBalance)]
    );
    assert_eq!(accounts(&ledger), accounts_before);
    assert_eq!(ledger.transfer_count(), 1);
    // The same ids then go through, where a recorded failure would have kept them failed.
    assert_eq!(
        ledger.apply_unrecorded(secs(2), &[posted(1, WALLET, MERCHANT, 600)]),
        vec![Ok(())]
    );
    assert_eq!(account(&ledger, WALLET).posted_balance(), 400);
}

#[test]
fn an_unrecorded_transfer_reusing_a_recorded_id_is_refused() {
    let mut ledger = ledger();
    let accounts_before = accounts(&ledger);
    assert_eq!(
        ledger.apply_unrecorded(
            secs(1),
            &[Transfer {
                id: TOP_UP,
                ..posted(0, WALLET, MERCHANT, 10)
            }]
        ),
        vec![Err(ExistsWithDifferentFields)]
    );
    assert_eq!(accounts(&ledger), accounts_before);
}

#[test]
#[should_panic(expected = "only posted transfers go unrecorded")]
fn a_hold_cannot_go_unrecorded() {
    let mut ledger = ledger();
    ledger.apply_unrecorded(secs(1), &[pending(1, WALLET, MERCHANT, 10, 0)]);
}
