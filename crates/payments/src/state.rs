//! The state machine: applies [`Record`]s and answers queries.
//!
//! A state is whole (every object in memory: the journal replayed), a working set (the
//! objects one batch reads, loaded by a store that keeps the rest, [`working`]) or a cache
//! (some objects in memory, the rest on disk behind [`Disk`], [`cache`]). The rules are the
//! same in all three: a record's reads are loaded before it is applied.

use std::collections::HashSet;
use std::sync::Arc;

use farthing_kernel::{LastUse, Table};
use farthing_ledger::{
    AccountId, Amount, Currency, IdHashBuilder, Ledger, ShardedMap, Timestamp, Transfer,
    TransferId, TransferKind, TransferRejection,
};

use crate::disk::{Disk, PartyLists};
use crate::history::{Generation, Line, PaymentRow, RefundRow, Refunded, TopupRow};
use crate::idempotency::{Idempotency, IdempotencyLookup};
use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::kinds::{Kinds, Rows};
use crate::model::*;
use crate::parties::Parties;

mod cache;
mod import;
mod queries;
mod working;

/// A batch's payments looked up together ([`State::warm`]) before they are paid.
const WARM_AHEAD: usize = 16;

/// Accounts held from which a batch's lookups are made ahead ([`State::warm`]): with fewer,
/// the tables fit the processor's caches and looking twice only costs.
const WARM_ACCOUNTS_MIN: usize = 1 << 16;

pub use cache::{CACHE_SHARDS, Checkpoint, Fetched, LOAD_ROUNDS_MAX};

/// What a working set has done since its changes were last taken, beyond what its tables
/// track themselves.
#[derive(Default)]
struct Tracker {
    accounts_created: Vec<(Owner, Currency)>,
    payments: Vec<PaymentId>,
    topups: Vec<TopupId>,
    refunds: Vec<RefundId>,
    /// New statement lines, in the order made.
    lines: Vec<EntryObject>,
    /// Transfer records an import put in: they moved no money here.
    imported_transfers: HashSet<TransferId>,
    /// Transfer records made before the new ones.
    transfers_seen: usize,
    /// Accounts that transfers without records moved (a payment's legs): the records show
    /// the rest.
    accounts_moved: Vec<AccountId>,
}

/// A cache's link to its disk, and what it made since its last checkpoint began.
struct Cache {
    disk: Arc<dyn Disk>,
    /// Accounts made or changed since the last checkpoint began: kept up as they change, so
    /// that beginning a checkpoint finds them without a pass over the history.
    accounts_changed: HashSet<AccountId, IdHashBuilder>,
    /// Accounts changed since rows were last staged ([`State::stage_changes`]).
    accounts_unstaged: HashSet<AccountId, IdHashBuilder>,
    /// Accounts staged since the last checkpoint began, and how many changed again since.
    accounts_staged: usize,
    accounts_again: usize,
    /// Rows copied for the next checkpoint since the last one began.
    staged: cache::Staged,
    /// No id of any record applied is larger.
    id_max: u128,
    /// How many times rows have left memory ([`State::evictions`]).
    evictions: u64,
}

/// A page of a list, newest first.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

/// Totals of one currency across every account: both sums are zero when money is conserved.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CurrencyTotals {
    pub currency: Currency,
    pub posted_net: i128,
    pub pending_net: i128,
    pub accounts: usize,
}

/// An account's owner, and when the account was last used: a cache lets the accounts used
/// least recently go first. The owner's id is kept as two words, so that an entry of the
/// table (a million accounts) takes 32 bytes, not the 64 a 16-byte-aligned id would take.
struct Owned {
    id: [u64; 2],
    kind: u8,
    used: LastUse,
}

impl Owned {
    fn new(owner: Owner, round: u32) -> Owned {
        let (kind, id) = owner.parts();
        Owned {
            id: [(id >> 64) as u64, id as u64],
            kind,
            used: LastUse::new(round),
        }
    }

    fn owner(&self) -> Owner {
        let id = (u128::from(self.id[0]) << 64) | u128::from(self.id[1]);
        Owner::from_parts(self.kind, id).expect("made from an owner's parts")
    }
}

/// Farthing's state. Only [`State::apply`] changes what it means; loading and forgetting
/// change only what it holds in memory.
pub struct State {
    ledger: Ledger,
    parties: Parties,
    /// Each merchant's and payer's list heads and accounts, by party.
    merchant_lists: Table<MerchantId, PartyLists, IdHashBuilder>,
    payer_lists: Table<PayerId, PartyLists, IdHashBuilder>,
    /// The owner of every account held.
    owners: ShardedMap<AccountId, Owned, IdHashBuilder>,
    /// History made since the last checkpoint began (a whole state's, all of it).
    young: Generation,
    /// History a checkpoint is writing, with the position the checkpoint began at: read from
    /// memory until it is on disk.
    frozen: Option<(u64, Arc<Generation>)>,
    /// History read back from disk.
    loaded: Generation,
    /// Refund totals of refunded payments.
    refunded: Table<PaymentId, Refunded, IdHashBuilder>,
    /// State rows of every registered kind ([`crate::kinds`]): holds among them.
    kinds: Kinds,
    /// The newest payment: the head of the operator's list.
    newest_payment: Option<PaymentId>,
    idempotency: Idempotency,
    records_applied: u64,
    /// The latest time of any record applied.
    last_time: Timestamp,
    merchants: u64,
    payers: u64,
    /// Payments and transfer records in generations before the young one.
    payments_before: u64,
    transfers_before: u64,
    /// What has changed since [`State::take_changes`], for a working set.
    tracker: Option<Box<Tracker>>,
    /// For a cache: its disk.
    cache: Option<Box<Cache>>,
}

impl Default for State {
    fn default() -> Self {
        State::new()
    }
}

impl State {
    pub fn new() -> State {
        State {
            ledger: Ledger::new(),
            parties: Parties::default(),
            merchant_lists: Table::default(),
            payer_lists: Table::default(),
            owners: ShardedMap::default(),
            young: Generation::default(),
            frozen: None,
            loaded: Generation::default(),
            refunded: Table::default(),
            kinds: Kinds::default(),
            newest_payment: None,
            idempotency: Idempotency::default(),
            records_applied: 0,
            last_time: Timestamp(0),
            merchants: 0,
            payers: 0,
            payments_before: 0,
            transfers_before: 0,
            tracker: None,
            cache: None,
        }
    }

    /// How many records have been applied: the position in the journal.
    pub fn records_applied(&self) -> u64 {
        self.records_applied
    }

    /// The latest time of any record applied: new records should not be older.
    pub fn last_time(&self) -> Timestamp {
        self.last_time
    }

    /// Applies one record. Deterministic: the same records in the same order give the same
    /// state and the same outcomes.
    pub fn apply(&mut self, record: &Record) -> Outcome {
        self.records_applied += 1;
        self.last_time = self.last_time.max(record.now);
        if let Some(cache) = &mut self.cache {
            cache.id_max = cache.id_max.max(ids_max(&record.command));
        }
        if let Some(claim) = &record.idempotency {
            match self.idempotency_lookup(&claim.key, &claim.fingerprint) {
                IdempotencyLookup::New => {}
                IdempotencyLookup::Replay(outcome) => return outcome.clone(),
                IdempotencyLookup::Reused => {
                    return Outcome::Rejected(Rejection::IdempotencyKeyReused);
                }
            }
        }
        let outcome = self.execute(record.now, &record.command);
        if let Some(claim) = &record.idempotency
            && outcome.is_kept_for_idempotency()
        {
            self.idempotency.keep(claim, outcome.clone(), record.now);
        }
        outcome
    }

    fn execute(&mut self, now: Timestamp, command: &Command) -> Outcome {
        match command {
            Command::SetOperatorKey { key_hash } => {
                match self.parties.set_operator_key(*key_hash) {
                    Ok(()) => Outcome::OperatorKeySet,
                    Err(rejection) => Outcome::Rejected(rejection),
                }
            }
            Command::CreateMerchant {
                id,
                name,
                key_hash,
                fee,
            } => {
                let merchant = Merchant {
                    id: *id,
                    name: name.clone(),
                    fee: *fee,
                    created_at: now,
                };
                if let Err(rejection) = self.parties.create_merchant(merchant.clone(), *key_hash) {
                    return Outcome::Rejected(rejection);
                }
                self.merchant_lists.put(*id, PartyLists::default());
                self.merchants += 1;
                Outcome::MerchantCreated(merchant)
            }
            Command::CreatePayer { id, name, key_hash } => {
                let payer = Payer {
                    id: *id,
                    name: name.clone(),
                    created_at: now,
                };
                if let Err(rejection) = self.parties.create_payer(payer.clone(), *key_hash) {
                    return Outcome::Rejected(rejection);
                }
                self.payer_lists.put(*id, PartyLists::default());
                self.payers += 1;
                Outcome::PayerCreated(payer)
            }
            Command::Topup {
                id,
                payer,
                amount,
                currency,
                source,
                transfer_id,
            } => self.topup(now, *id, *payer, *amount, *currency, *source, *transfer_id),
            Command::Pay(pay) => match self.pay(now, pay) {
                Ok(payment) => Outcome::Paid(payment.clone()),
                Err(rejection) => Outcome::Rejected(rejection),
            },
            Command::PayBatch(items) => {
                let mut outcomes = Vec::with_capacity(items.len());
                let warm = self.ledger.account_count() >= WARM_ACCOUNTS_MIN;
                for chunk in items.chunks(WARM_AHEAD) {
                    if warm {
                        let found: usize = chunk.iter().map(|pay| self.warm(pay)).sum();
                        std::hint::black_box(found);
                    }
                    outcomes.extend(chunk.iter().map(|pay| match self.pay(now, pay) {
                        Ok(payment) => BatchItemOutcome::Succeeded(payment.id),
                        Err(rejection) => BatchItemOutcome::Failed(rejection),
                    }));
                }
                Outcome::PaidBatch(outcomes)
            }
            Command::Refund {
                id,
                payment,
                amount,
                caller,
                transfer_ids,
            } => match self.refund(now, *id, *payment, *amount, *caller, *transfer_ids) {
                Ok(refund) => Outcome::Refunded(refund),
                Err(rejection) => Outcome::Rejected(rejection),
            },
            Command::PruneIdempotencyKeys { before } => {
                self.idempotency.prune(*before);
                self.count_eviction();
                Outcome::Pruned
            }
            Command::Import(items) => self.import(items),
            Command::Room(command) => match command.execute(self, now) {
                Ok(outcome) => Outcome::Room(outcome),
                Err(rejection) => Outcome::Rejected(rejection),
            },
        }
    }

    /// The id of `owner`'s account in `currency`, if it is held: a use of the account.
    fn account_of_owner(&self, owner: Owner, currency: Currency) -> Option<AccountId> {
        let id = account_id(owner, currency);
        let owned = self.owners.get(&id)?;
        (owned.owner() == owner).then(|| {
            owned.used.mark(self.round());
            id
        })
    }

    /// The round of changes under way: the tables end theirs together, each time a checkpoint
    /// takes the changes. How recently a row was used is counted in rounds.
    fn round(&self) -> u32 {
        self.payer_lists.round()
    }

    /// The account of `owner` in `currency`, made on first use. Its id is derived from the
    /// owner and the currency, so every process and every copy computes the same one; an id
    /// already held by another owner (a 2⁻⁶⁴ event) refuses the command.
    pub(crate) fn account_for(
        &mut self,
        owner: Owner,
        currency: Currency,
    ) -> Result<AccountId, Rejection> {
        if let Some(id) = self.account_of_owner(owner, currency) {
            return Ok(id);
        }
        let id = account_id(owner, currency);
        if self.ledger.account(id).is_some() {
            return Err(Rejection::IdCollision);
        }
        self.ledger
            .create_account(id, owner.account_kind(), currency)
            .expect("a fresh account id is free");
        self.owners.insert(id, Owned::new(owner, self.round()));
        if let Some(tracker) = &mut self.tracker {
            tracker.accounts_created.push((owner, currency));
        }
        self.touched(&[id]);
        self.list_account(owner, currency, id);
        Ok(id)
    }

    /// Notes accounts whose totals changed, for a cache's next checkpoint.
    pub(crate) fn touched(&mut self, accounts: &[AccountId]) {
        if let Some(cache) = &mut self.cache {
            for &id in accounts {
                let first = cache.accounts_changed.insert(id);
                // Changed before in this checkpoint's round and not waiting: staged since.
                if cache.accounts_unstaged.insert(id) && !first {
                    cache.accounts_again += 1;
                }
            }
        }
    }

    /// Notes that `payer`'s wallet changed, for a cache's next checkpoint: its row, which
    /// holds its accounts, is a change. Cheaper than [`State::touched`] for the wallet: the
    /// payer's row was just read, and no set of changed accounts grows by it.
    pub(crate) fn touched_wallet(&mut self, payer: PayerId) {
        if self.cache.is_some() {
            self.payer_lists
                .update(&payer, |_| ())
                .expect("a payer whose wallet changed is held");
        }
    }

    /// Adds an account to its owner's list, if the owner is a party.
    fn list_account(&mut self, owner: Owner, currency: Currency, id: AccountId) {
        let add = |lists: &mut PartyLists| lists.accounts.push((currency, id));
        match owner {
            Owner::Payer(payer) => {
                self.payer_lists.update(&payer, add);
            }
            Owner::Merchant(merchant) => {
                self.merchant_lists.update(&merchant, add);
            }
            Owner::PlatformFees | Owner::ExternalFunding => {}
        }
    }

    /// Whether any of these ledger ids was used before. A command's transfers must be new: a
    /// reused id would make the ledger answer with its first outcome, and the command would
    /// then look done while moving no money.
    pub(crate) fn transfer_ids_taken(&self, ids: &[TransferId]) -> bool {
        ids.iter().any(|id| self.ledger.transfer(*id).is_some())
    }

    /// Whether the ledger would refuse `pay` for want of funds in `wallet`: the wallet cannot
    /// cover the amount, and no total the payment's legs touch could overflow first (the
    /// ledger checks overflow before balance, and then answers `AmountTooLarge`).
    pub(crate) fn certainly_short(&self, wallet: AccountId, pay: &PayCommand) -> bool {
        let amount = pay.amount.micros();
        let account = self.ledger.account(wallet).expect("account exists");
        if account.available() >= i128::from(amount) {
            return false;
        }
        let fits = |total: u64| {
            total
                .checked_add(amount)
                .is_some_and(|sum| sum <= farthing_ledger::TOTAL_MICROS_MAX)
        };
        let credits_fit = |owner: Owner| match self.account_of_owner(owner, pay.currency) {
            Some(id) => fits(
                self.ledger
                    .account(id)
                    .expect("account exists")
                    .credits_posted,
            ),
            None => fits(0),
        };
        fits(account.debits_posted)
            && credits_fit(Owner::Merchant(pay.merchant))
            && credits_fit(Owner::PlatformFees)
    }

    pub(crate) fn posted_balance(&self, account: AccountId) -> Amount {
        let balance = self
            .ledger
            .account(account)
            .expect("account exists")
            .posted_balance();
        Amount::from_micros(u64::try_from(balance).expect("limited accounts are never negative"))
    }

    #[allow(clippy::too_many_arguments)]
    fn topup(
        &mut self,
        now: Timestamp,
        id: TopupId,
        payer: PayerId,
        amount: Amount,
        currency: Currency,
        source: FundingSource,
        transfer_id: TransferId,
    ) -> Outcome {
        if self.parties.payer(payer).is_none() {
            return Outcome::Rejected(Rejection::PayerNotFound);
        }
        if self.topup_row(id).is_some() || self.transfer_ids_taken(&[transfer_id]) {
            return Outcome::Rejected(Rejection::IdCollision);
        }
        if amount.is_zero() {
            return Outcome::Rejected(Rejection::AmountNotPositive);
        }
        if source == FundingSource::SandboxDecline {
            return Outcome::Rejected(Rejection::FundingDeclined);
        }
        let accounts = self
            .account_for(Owner::ExternalFunding, currency)
            .and_then(|external| Ok((external, self.account_for(Owner::Payer(payer), currency)?)));
        let (external, wallet) = match accounts {
            Ok(accounts) => accounts,
            Err(rejection) => return Outcome::Rejected(rejection),
        };
        let transfer = Transfer {
            id: transfer_id,
            debit: external,
            credit: wallet,
            amount,
            kind: TransferKind::Posted,
            linked: false,
        };
        if let Err(rejection) = self.ledger.apply(now, &[transfer])[0] {
            return Outcome::Rejected(ledger_rejection(rejection));
        }
        self.touched(&[external]);
        self.touched_wallet(payer);
        let topup = Topup {
            id,
            payer,
            amount,
            currency,
            source,
            created_at: now,
        };
        let balance_after = self.posted_balance(wallet);
        self.young.topups.insert(
            id,
            TopupRow {
                topup: topup.clone(),
                line: None,
            },
        );
        self.add_line(payer, EntryObject::Topup(id), balance_after);
        if let Some(tracker) = &mut self.tracker {
            tracker.topups.push(id);
        }
        Outcome::ToppedUp(topup)
    }

    /// The checks a new payment, paid at once or held, passes first: its merchant (whose fee
    /// schedule it gives) and payer exist, its id is free, its amount is positive, and the
    /// payer has a wallet in its currency (which it gives: without one there is nothing to
    /// spend).
    pub(crate) fn new_payment_checked(
        &self,
        pay: &PayCommand,
    ) -> Result<(FeeSchedule, AccountId), Rejection> {
        let fee_schedule = match self.parties.merchant(pay.merchant) {
            Some(merchant) => merchant.fee,
            None => return Err(Rejection::MerchantNotFound),
        };
        if self.parties.payer(pay.payer).is_none() {
            return Err(Rejection::PayerNotFound);
        }
        if self.payment_row(pay.id).is_some() {
            return Err(Rejection::IdCollision);
        }
        if pay.amount.is_zero() {
            return Err(Rejection::AmountNotPositive);
        }
        match self.account_of_owner(Owner::Payer(pay.payer), pay.currency) {
            Some(wallet) => Ok((fee_schedule, wallet)),
            None => Err(Rejection::InsufficientFunds),
        }
    }

    /// Looks up what paying `pay` looks up, and changes nothing. Over a few of a batch's
    /// payments before they are paid, these lookups are independent of each other, so the
    /// processor waits for their memory together rather than one miss after another; paying
    /// then finds the rows in its caches. Returns how many were found, for the caller to
    /// keep the lookups from being optimized away.
    fn warm(&self, pay: &PayCommand) -> usize {
        let wallet = account_id(Owner::Payer(pay.payer), pay.currency);
        let tracked = self.cache.as_ref().is_some_and(|cache| {
            cache.accounts_changed.contains(&wallet) | cache.accounts_unstaged.contains(&wallet)
        });
        usize::from(self.parties.payer(pay.payer).is_some())
            + usize::from(self.owners.get(&wallet).is_some())
            + usize::from(self.ledger.account(wallet).is_some())
            + usize::from(self.payer_lists.holds(&pay.payer))
            + usize::from(self.payment_row(pay.id).is_some())
            + pay
                .transfer_ids
                .iter()
                .map(|id| usize::from(self.ledger.transfer(*id).is_some()))
                .sum::<usize>()
            + usize::from(tracked)
    }

    fn pay(&mut self, now: Timestamp, pay: &PayCommand) -> Result<&Payment, Rejection> {
        let (fee_schedule, wallet) = self.new_payment_checked(pay)?;
        // The legs go unrecorded (the payment's row says what they moved), so the ledger
        // cannot tell that one repeats the other.
        if self.transfer_ids_taken(&pay.transfer_ids) || pay.transfer_ids[0] == pay.transfer_ids[1]
        {
            return Err(Rejection::IdCollision);
        }
        // Refused before anything is touched: a payment the wallet cannot cover makes no
        // account and leaves no failed transfer behind, so refusals cost no space.
        if self.certainly_short(wallet, pay) {
            return Err(Rejection::InsufficientFunds);
        }
        let fee = fee_schedule.fee_on(pay.amount);
        let net = pay
            .amount
            .checked_sub(fee)
            .expect("the fee never exceeds the amount");
        let merchant_account = self.account_for(Owner::Merchant(pay.merchant), pay.currency)?;
        let fees_account = self.account_for(Owner::PlatformFees, pay.currency)?;
        let legs = legs(
            [(wallet, merchant_account, net), (wallet, fees_account, fee)],
            pay.transfer_ids,
        );
        // A payment's legs leave no transfer records: its row holds what they moved, and
        // they are two of every three rows a payment would otherwise keep.
        if let Some(rejection) = chain_failure(&self.ledger.apply_unrecorded(now, &legs)) {
            return Err(ledger_rejection(rejection));
        }
        self.touched(&[merchant_account, fees_account]);
        self.touched_wallet(pay.payer);
        if let Some(tracker) = &mut self.tracker {
            tracker
                .accounts_moved
                .extend(legs.iter().flat_map(|leg| [leg.debit, leg.credit]));
        }
        let balance_after = self.posted_balance(wallet);
        let payment = pay.made(now, fee);
        self.add_payment(payment, Some(balance_after));
        self.stage_payer(pay.payer);
        Ok(&self.young.payments.last().expect("just added").payment)
    }

    fn refund(
        &mut self,
        now: Timestamp,
        id: RefundId,
        payment_id: PaymentId,
        requested: Option<Amount>,
        caller: Principal,
        transfer_ids: [TransferId; 2],
    ) -> Result<Refund, Rejection> {
        let payment = self.payment_settled_by(payment_id, caller)?;
        if !payment.is_settled() {
            return Err(HoldRejection::PaymentNotCaptured.into());
        }
        if self.refund_row(id).is_some() || self.transfer_ids_taken(&transfer_ids) {
            return Err(Rejection::IdCollision);
        }
        let remaining = payment
            .amount
            .checked_sub(payment.amount_refunded)
            .expect("refunds never exceed the payment");
        let amount = requested.unwrap_or(remaining);
        if amount.is_zero() || amount > remaining {
            return Err(Rejection::RefundExceedsPayment);
        }
        // The fee comes back in proportion, computed on the running total so that a payment
        // refunded in several parts returns exactly its whole fee.
        let refunded_after = payment
            .amount_refunded
            .checked_add(amount)
            .expect("bounded by the payment amount");
        let fee_after = payment
            .fee
            .mul_div_floor(refunded_after.micros(), payment.amount.micros())
            .expect("at most the fee");
        let fee_back = fee_after
            .checked_sub(payment.fee_refunded)
            .expect("the running fee share only grows");
        let net_back = amount.checked_sub(fee_back).expect("fee share ≤ amount");
        let wallet = self.account_for(Owner::Payer(payment.payer), payment.currency)?;
        let merchant_account =
            self.account_for(Owner::Merchant(payment.merchant), payment.currency)?;
        let fees_account = self.account_for(Owner::PlatformFees, payment.currency)?;
        let legs = legs(
            [
                (merchant_account, wallet, net_back),
                (fees_account, wallet, fee_back),
            ],
            transfer_ids,
        );
        match chain_failure(&self.ledger.apply(now, &legs)) {
            None => {}
            Some(TransferRejection::ExceedsAvailableBalance) => {
                return Err(Rejection::MerchantBalanceInsufficient);
            }
            Some(rejection) => return Err(ledger_rejection(rejection)),
        }
        self.touched(&[wallet, merchant_account, fees_account]);
        let balance_after = self.posted_balance(wallet);
        let refund = Refund {
            id,
            payment: payment_id,
            payer: payment.payer,
            merchant: payment.merchant,
            amount,
            currency: payment.currency,
            fee_refunded: fee_back,
            created_at: now,
        };
        self.refunded.put(
            payment_id,
            Refunded {
                amount_refunded: refunded_after,
                fee_refunded: fee_after,
            },
        );
        self.young.refunds.insert(
            id,
            RefundRow {
                refund: refund.clone(),
                line: None,
            },
        );
        self.add_line(payment.payer, EntryObject::Refund(id), balance_after);
        if let Some(tracker) = &mut self.tracker {
            tracker.refunds.push(id);
        }
        Ok(refund)
    }

    /// Puts a new payment at the head of its payer's, its merchant's and the operator's
    /// lists, and with `balance_after` its line at the head of the payer's statement (an
    /// import brings the line later, as an item of its own).
    pub(crate) fn add_payment(&mut self, payment: Payment, balance_after: Option<Amount>) {
        let id = payment.id;
        let heads = self.payer_lists.update(&payment.payer, |lists| {
            (
                lists.newest_payment.replace(id),
                balance_after.map(|_| lists.newest_line.replace(EntryObject::Payment(id))),
            )
        });
        let (previous_of_payer, previous_line) = heads.unwrap_or((None, None));
        let line = balance_after.map(|balance_after| Line {
            balance_after,
            previous: previous_line.flatten(),
        });
        let previous_of_merchant = self
            .merchant_lists
            .update(&payment.merchant, |lists| lists.newest_payment.replace(id))
            .flatten();
        let previous = self.newest_payment.replace(id);
        self.young.push_payment(PaymentRow {
            payment,
            previous_of_payer,
            previous_of_merchant,
            previous,
            line,
        });
        if let Some(tracker) = &mut self.tracker {
            tracker.payments.push(id);
            if line.is_some() {
                tracker.lines.push(EntryObject::Payment(id));
            }
        }
    }

    /// Puts `object`'s statement line at the head of `payer`'s statement. The object is held
    /// and has no line yet.
    pub(crate) fn add_line(&mut self, payer: PayerId, object: EntryObject, balance_after: Amount) {
        let previous = self
            .payer_lists
            .update(&payer, |lists| lists.newest_line.replace(object))
            .flatten();
        let line = Line {
            balance_after,
            previous,
        };
        assert!(
            self.line_held(object).is_none(),
            "an object has one statement line"
        );
        let young = &mut self.young;
        let slot = match object {
            EntryObject::Payment(id) => young
                .payment_index
                .get(&id)
                .map(|&index| &mut young.payments[index].line),
            EntryObject::Topup(id) => young.topups.get_mut(&id).map(|row| &mut row.line),
            EntryObject::Refund(id) => young.refunds.get_mut(&id).map(|row| &mut row.line),
        };
        match slot {
            Some(slot) => *slot = Some(line),
            // An import's line for an object of an older generation: a row of its own.
            None => {
                young.lines.insert(object, line);
            }
        }
        if let Some(tracker) = &mut self.tracker {
            tracker.lines.push(object);
        }
    }

    /// Applies ledger transfers (a room's legs), with their outcomes in order.
    pub(crate) fn transfer(
        &mut self,
        now: Timestamp,
        transfers: &[Transfer],
    ) -> Vec<Result<(), TransferRejection>> {
        self.ledger.apply(now, transfers)
    }

    /// Marks the pending transfer `id` expired, its amount back in its accounts' available
    /// balances. It is a live hold's: anything else is a bug.
    pub(crate) fn expire_pending(&mut self, id: TransferId) {
        self.ledger.expire_pending(id).unwrap_or_else(|rejection| {
            panic!("a live hold's pending transfer expires: {rejection:?}")
        });
    }

    /// The fee schedule of `merchant`, if it is held.
    pub(crate) fn merchant_fee(&self, merchant: MerchantId) -> Option<FeeSchedule> {
        self.parties.merchant(merchant).map(|merchant| merchant.fee)
    }

    // What memory holds.

    /// The holds memory holds, every live one among them.
    pub(crate) fn holds(&self) -> &Rows<HoldKind> {
        self.kinds.of::<HoldKind>()
    }

    pub(crate) fn holds_mut(&mut self) -> &mut Rows<HoldKind> {
        self.kinds.of_mut::<HoldKind>()
    }

    /// The history a checkpoint is writing, if one is.
    fn frozen_history(&self) -> Option<&Generation> {
        self.frozen.as_ref().map(|(_, history)| &**history)
    }

    /// A payment row in memory, of any generation.
    fn payment_row(&self, id: PaymentId) -> Option<&PaymentRow> {
        self.young
            .payment(id)
            .or_else(|| self.frozen_history().and_then(|frozen| frozen.payment(id)))
            .or_else(|| self.loaded.payment(id))
    }

    fn topup_row(&self, id: TopupId) -> Option<&TopupRow> {
        self.young
            .topups
            .get(&id)
            .or_else(|| {
                self.frozen_history()
                    .and_then(|frozen| frozen.topups.get(&id))
            })
            .or_else(|| self.loaded.topups.get(&id))
    }

    fn refund_row(&self, id: RefundId) -> Option<&RefundRow> {
        self.young
            .refunds
            .get(&id)
            .or_else(|| {
                self.frozen_history()
                    .and_then(|frozen| frozen.refunds.get(&id))
            })
            .or_else(|| self.loaded.refunds.get(&id))
    }

    /// The line of `object`, if memory holds it.
    fn line_held(&self, object: EntryObject) -> Option<Line> {
        self.young
            .line(object)
            .or_else(|| self.frozen_history().and_then(|frozen| frozen.line(object)))
            .or_else(|| self.loaded.line(object))
    }

    /// A payment `caller` may refund, capture or cancel: its merchant's, or any for the
    /// operator. Any other is answered as if it did not exist.
    pub(crate) fn payment_settled_by(
        &self,
        id: PaymentId,
        caller: Principal,
    ) -> Result<Payment, Rejection> {
        let payment = self.payment_held(id).ok_or(Rejection::PaymentNotFound)?;
        match caller {
            Principal::Operator => Ok(payment),
            Principal::Merchant(merchant) if merchant == payment.merchant => Ok(payment),
            Principal::Merchant(_) | Principal::Payer(_) => Err(Rejection::PaymentNotFound),
        }
    }

    /// A payment in memory as it is now, refunds and its hold included.
    pub(crate) fn payment_held(&self, id: PaymentId) -> Option<Payment> {
        let mut payment = self.payment_stored(id)?;
        if let Some(hold) = self.holds().hold(&id) {
            hold.apply_to(&mut payment);
        }
        Some(payment)
    }

    /// A payment in memory as a store keeps its row: refund totals included, its hold apart.
    fn payment_stored(&self, id: PaymentId) -> Option<Payment> {
        let row = self.payment_row(id)?;
        Some(with_refunds(
            row.payment.clone(),
            self.refunded.get(&id).copied(),
        ))
    }
}

/// The largest id a command names (payments, top-ups, refunds, transfers, and what an import
/// brings): a cache's bound on the ids of its history.
fn ids_max(command: &Command) -> u128 {
    match command {
        Command::Pay(pay) => pay.ids_max(),
        Command::PayBatch(items) => items.iter().map(PayCommand::ids_max).max().unwrap_or(0),
        Command::Room(command) => command.ids_max(),
        Command::Topup {
            id, transfer_id, ..
        } => id.to_u128().max(transfer_id.0),
        Command::Refund {
            id, transfer_ids, ..
        } => id.to_u128().max(transfer_ids[0].0).max(transfer_ids[1].0),
        Command::Import(items) => items
            .iter()
            .map(|item| match item {
                Imported::Transfer(record) => record.transfer.id.0,
                Imported::Payment(payment) => payment.id.to_u128(),
                Imported::Topup(topup) => topup.id.to_u128(),
                Imported::Refund(refund) => refund.id.to_u128(),
                Imported::Entry { entry, .. } => match entry.object {
                    EntryObject::Topup(id) => id.to_u128(),
                    EntryObject::Payment(id) => id.to_u128(),
                    EntryObject::Refund(id) => id.to_u128(),
                },
                _ => 0,
            })
            .max()
            .unwrap_or(0),
        Command::SetOperatorKey { .. }
        | Command::CreateMerchant { .. }
        | Command::CreatePayer { .. }
        | Command::PruneIdempotencyKeys { .. } => 0,
    }
}

/// `payment` with the refund totals a refund made since it was recorded.
fn with_refunds(mut payment: Payment, refunded: Option<Refunded>) -> Payment {
    if let Some(refunded) = refunded {
        payment.amount_refunded = refunded.amount_refunded;
        payment.fee_refunded = refunded.fee_refunded;
    }
    payment
}

/// The ledger id of `owner`'s account in `currency`: a 64-bit mix of both. Owner ids are
/// random 128-bit values chosen by the server, never by callers, so a fast mixing function
/// spreads them as well as a cryptographic hash would; collisions are still checked.
pub fn account_id(owner: Owner, currency: Currency) -> AccountId {
    use std::hash::Hasher;
    let (kind, id) = owner.parts();
    let mut hasher = farthing_ledger::IdHasher::default();
    hasher.write_u8(kind);
    hasher.write_u128(id);
    hasher.write_u32(currency.to_u32());
    // Zero is not an account id.
    AccountId(hasher.finish().max(1))
}

/// The ledger transfers for up to two legs, linked, skipping legs of zero.
fn legs(parts: [(AccountId, AccountId, Amount); 2], ids: [TransferId; 2]) -> Vec<Transfer> {
    let mut transfers: Vec<Transfer> = parts
        .iter()
        .zip(ids)
        .filter(|((_, _, amount), _)| !amount.is_zero())
        .map(|(&(debit, credit, amount), id)| Transfer {
            id,
            debit,
            credit,
            amount,
            kind: TransferKind::Posted,
            linked: true,
        })
        .collect();
    transfers
        .last_mut()
        .expect("a positive amount leaves at least one leg")
        .linked = false;
    transfers
}

/// Why a linked chain of legs failed, if it did: the failing leg's own rejection. Its partners
/// only report `LinkedEventFailed`, and may come first (a payment whose merchant leg fits but
/// whose fee leg does not).
pub(crate) fn chain_failure(
    outcomes: &[Result<(), TransferRejection>],
) -> Option<TransferRejection> {
    let mut failures = outcomes.iter().filter_map(|outcome| outcome.err());
    let first = failures.next()?;
    Some(
        std::iter::once(first)
            .chain(failures)
            .find(|rejection| *rejection != TransferRejection::LinkedEventFailed)
            .unwrap_or(first),
    )
}

pub(crate) fn ledger_rejection(rejection: TransferRejection) -> Rejection {
    match rejection {
        TransferRejection::ExceedsAvailableBalance => Rejection::InsufficientFunds,
        TransferRejection::Overflow => Rejection::AmountTooLarge,
        TransferRejection::ExistsWithDifferentFields => Rejection::IdCollision,
        // Ids the ledger cannot use: zero, or already spent on another transfer (a record
        // applied twice, or ids chosen badly). Refused, and a fresh request gets fresh ids.
        TransferRejection::IdMustNotBeZero
        | TransferRejection::LinkedEventFailed
        | TransferRejection::LinkedEventChainOpen => Rejection::IdCollision,
        TransferRejection::AmountMustNotBeZero => Rejection::AmountNotPositive,
        other => {
            panic!("the payments layer never builds a transfer the ledger refuses as {other:?}")
        }
    }
}
