//! The state machine: applies [`Record`]s and answers queries.

use std::collections::{BTreeSet, HashMap, HashSet};

use farthing_ledger::{
    Account, AccountId, Amount, Currency, IdHashBuilder, Ledger, Timestamp, Transfer, TransferId,
    TransferKind, TransferRecord, TransferRejection,
};

use crate::idempotency::{Idempotency, IdempotencyLookup};
use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;
use crate::parties::Parties;
use crate::working_set::*;

mod import;

/// A payment with the payment made before it in each list that shows it. Lists are chains
/// walked from their newest item: nothing about a list grows but its items, so a store can
/// keep old items on disk and the rest of a list needs no index.
struct PaymentRow {
    payment: Payment,
    /// The payer's payment before this one.
    previous_of_payer: Option<PaymentId>,
    /// The merchant's payment before this one.
    previous_of_merchant: Option<PaymentId>,
    /// The payment made before this one, of any party (the operator's list).
    previous: Option<PaymentId>,
    line: Option<Line>,
}

/// A statement line, kept with the object it shows (a top-up, payment or refund, which give
/// the rest of the line): the payer's posted balance after it, and the payer's line before it.
/// Every object made here has one; an import brings it as an item of its own, after the
/// object.
#[derive(Clone, Copy)]
struct Line {
    balance_after: Amount,
    previous: Option<EntryObject>,
}

struct TopupRow {
    topup: Topup,
    line: Option<Line>,
}

struct RefundRow {
    refund: Refund,
    line: Option<Line>,
}

/// The newest item of each of a party's lists, and its accounts.
#[derive(Default)]
struct PartyLists {
    newest_payment: Option<PaymentId>,
    /// The payer's newest statement line (merchants have no statement).
    newest_line: Option<EntryObject>,
    accounts: Vec<(Currency, AccountId)>,
}

impl PartyLists {
    fn new() -> PartyLists {
        PartyLists::default()
    }
}

/// What a working set has done since its changes were last taken, beyond what its tables
/// track themselves.
#[derive(Default)]
struct Tracker {
    accounts_created: Vec<(Owner, Currency)>,
    payments: Vec<PaymentId>,
    topups: Vec<TopupId>,
    refunds: Vec<RefundId>,
    refunded: Vec<PaymentId>,
    /// New statement lines, in the order made.
    lines: Vec<EntryObject>,
    /// Transfer records an import put in: they moved no money here.
    imported_transfers: HashSet<TransferId>,
    /// Transfer records held (loaded or reported) before the new ones.
    transfers_seen: usize,
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

/// Farthing's whole state, in memory. Only [`State::apply`] changes it.
pub struct State {
    ledger: Ledger,
    parties: Parties,
    /// Each merchant's and payer's payments, statement lines and accounts, by party.
    merchant_lists: HashMap<MerchantId, PartyLists, IdHashBuilder>,
    payer_lists: HashMap<PayerId, PartyLists, IdHashBuilder>,
    accounts: HashMap<(Owner, Currency), AccountId, IdHashBuilder>,
    payments: Vec<PaymentRow>,
    /// Where each payment's row is. Rows live in one growing vector and the map holds only
    /// their positions: inserting into a hash table of large rows touches a random page per
    /// insert, which cost more than all the rest of a payment.
    payment_index: HashMap<PaymentId, usize, IdHashBuilder>,
    /// The newest payment: the head of the operator's list.
    newest_payment: Option<PaymentId>,
    topups: HashMap<TopupId, TopupRow, IdHashBuilder>,
    refunds: HashMap<RefundId, RefundRow, IdHashBuilder>,
    idempotency: Idempotency,
    records_applied: u64,
    /// The latest time of any record applied.
    last_time: Timestamp,
    /// What has changed since [`State::take_changes`], for a working set; `None` (the embedded
    /// store's whole state) tracks nothing.
    tracker: Option<Box<Tracker>>,
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
            merchant_lists: HashMap::default(),
            payer_lists: HashMap::default(),
            accounts: HashMap::default(),
            payments: Vec::new(),
            payment_index: HashMap::default(),
            newest_payment: None,
            topups: HashMap::default(),
            refunds: HashMap::default(),
            idempotency: Idempotency::default(),
            records_applied: 0,
            last_time: Timestamp(0),
            tracker: None,
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
                self.merchant_lists.insert(*id, PartyLists::new());
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
                self.payer_lists.insert(*id, PartyLists::new());
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
            Command::PayBatch(items) => Outcome::PaidBatch(
                items
                    .iter()
                    .map(|pay| match self.pay(now, pay) {
                        Ok(payment) => BatchItemOutcome::Succeeded(payment.id),
                        Err(rejection) => BatchItemOutcome::Failed(rejection),
                    })
                    .collect(),
            ),
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
                Outcome::Pruned
            }
            Command::Import(items) => self.import(items),
        }
    }

    /// The account of `owner` in `currency`, made on first use. Its id is derived from the
    /// owner and the currency, so every process and every copy computes the same one; an id
    /// already held by another owner (a 2⁻⁶⁴ event) refuses the command.
    fn account_for(&mut self, owner: Owner, currency: Currency) -> Result<AccountId, Rejection> {
        if let Some(id) = self.accounts.get(&(owner, currency)) {
            return Ok(*id);
        }
        let id = account_id(owner, currency);
        if self.ledger.account(id).is_some() {
            return Err(Rejection::IdCollision);
        }
        self.ledger
            .create_account(id, owner.account_kind(), currency)
            .expect("a fresh account id is free");
        self.accounts.insert((owner, currency), id);
        if let Some(tracker) = &mut self.tracker {
            tracker.accounts_created.push((owner, currency));
        }
        match owner {
            Owner::Payer(payer) => {
                if let Some(lists) = self.payer_lists.get_mut(&payer) {
                    lists.accounts.push((currency, id));
                }
            }
            Owner::Merchant(merchant) => {
                if let Some(lists) = self.merchant_lists.get_mut(&merchant) {
                    lists.accounts.push((currency, id));
                }
            }
            Owner::PlatformFees | Owner::ExternalFunding => {}
        }
        Ok(id)
    }

    /// Whether any of these ledger ids was used before. A command's transfers must be new: a
    /// reused id would make the ledger answer with its first outcome, and the command would
    /// then look done while moving no money.
    fn transfer_ids_taken(&self, ids: &[TransferId]) -> bool {
        ids.iter().any(|id| self.ledger.transfer(*id).is_some())
    }

    /// Whether the ledger would refuse `pay` for want of funds in `wallet`: the wallet cannot
    /// cover the amount, and no total the payment's legs touch could overflow first (the
    /// ledger checks overflow before balance, and then answers `AmountTooLarge`).
    fn certainly_short(&self, wallet: AccountId, pay: &PayCommand) -> bool {
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
        let credits_fit = |owner: Owner| match self.accounts.get(&(owner, pay.currency)) {
            Some(&id) => fits(
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

    fn posted_balance(&self, account: AccountId) -> Amount {
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
        if self.topups.contains_key(&id) || self.transfer_ids_taken(&[transfer_id]) {
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
        let topup = Topup {
            id,
            payer,
            amount,
            currency,
            source,
            created_at: now,
        };
        let balance_after = self.posted_balance(wallet);
        self.topups.insert(
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

    fn pay(&mut self, now: Timestamp, pay: &PayCommand) -> Result<&Payment, Rejection> {
        let fee_schedule = match self.parties.merchant(pay.merchant) {
            Some(merchant) => merchant.fee,
            None => return Err(Rejection::MerchantNotFound),
        };
        if self.parties.payer(pay.payer).is_none() {
            return Err(Rejection::PayerNotFound);
        }
        if self.payment_index.contains_key(&pay.id) {
            return Err(Rejection::IdCollision);
        }
        if pay.amount.is_zero() {
            return Err(Rejection::AmountNotPositive);
        }
        // A payer without a wallet in this currency has nothing to spend.
        let Some(&wallet) = self.accounts.get(&(Owner::Payer(pay.payer), pay.currency)) else {
            return Err(Rejection::InsufficientFunds);
        };
        if self.transfer_ids_taken(&pay.transfer_ids) {
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
        if let Some(rejection) = chain_failure(&self.ledger.apply(now, &legs)) {
            return Err(ledger_rejection(rejection));
        }
        let balance_after = self.posted_balance(wallet);
        let payment = Payment {
            id: pay.id,
            payer: pay.payer,
            merchant: pay.merchant,
            amount: pay.amount,
            currency: pay.currency,
            fee,
            description: pay.description.clone(),
            reference: pay.reference.clone(),
            created_at: now,
            amount_refunded: Amount::ZERO,
            fee_refunded: Amount::ZERO,
        };
        self.add_payment(payment, Some(balance_after));
        Ok(&self.payments.last().expect("just added").payment)
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
        let Some(row) = self.payment_row(payment_id) else {
            return Err(Rejection::PaymentNotFound);
        };
        let payment = row.payment.clone();
        let allowed = match caller {
            Principal::Operator => true,
            Principal::Merchant(merchant) => merchant == payment.merchant,
            Principal::Payer(_) => false,
        };
        if !allowed {
            return Err(Rejection::PaymentNotFound);
        }
        if self.refunds.contains_key(&id) || self.transfer_ids_taken(&transfer_ids) {
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
        let index = self.payment_index[&payment_id];
        let row = &mut self.payments[index];
        row.payment.amount_refunded = refunded_after;
        row.payment.fee_refunded = fee_after;
        self.refunds.insert(
            id,
            RefundRow {
                refund: refund.clone(),
                line: None,
            },
        );
        self.add_line(payment.payer, EntryObject::Refund(id), balance_after);
        if let Some(tracker) = &mut self.tracker {
            tracker.refunds.push(id);
            tracker.refunded.push(payment_id);
        }
        Ok(refund)
    }

    /// Puts a new payment at the head of its payer's, its merchant's and the operator's
    /// lists, and with `balance_after` its line at the head of the payer's statement (an
    /// import brings the line later, as an item of its own).
    fn add_payment(&mut self, payment: Payment, balance_after: Option<Amount>) {
        let id = payment.id;
        let (previous_of_payer, line) = match self.payer_lists.get_mut(&payment.payer) {
            Some(lists) => (
                lists.newest_payment.replace(id),
                balance_after.map(|balance_after| Line {
                    balance_after,
                    previous: lists.newest_line.replace(EntryObject::Payment(id)),
                }),
            ),
            None => (
                None,
                balance_after.map(|balance_after| Line {
                    balance_after,
                    previous: None,
                }),
            ),
        };
        let previous_of_merchant = self
            .merchant_lists
            .get_mut(&payment.merchant)
            .and_then(|lists| lists.newest_payment.replace(id));
        let previous = self.newest_payment.replace(id);
        let earlier = self.payment_index.insert(id, self.payments.len());
        assert!(earlier.is_none(), "a payment id is used once");
        self.payments.push(PaymentRow {
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
    fn add_line(&mut self, payer: PayerId, object: EntryObject, balance_after: Amount) {
        let previous = self
            .payer_lists
            .get_mut(&payer)
            .and_then(|lists| lists.newest_line.replace(object));
        let slot = match object {
            EntryObject::Payment(id) => {
                let index = self.payment_index[&id];
                &mut self.payments[index].line
            }
            EntryObject::Topup(id) => &mut self.topups.get_mut(&id).expect("held").line,
            EntryObject::Refund(id) => &mut self.refunds.get_mut(&id).expect("held").line,
        };
        assert!(slot.is_none(), "an object has one statement line");
        *slot = Some(Line {
            balance_after,
            previous,
        });
        if let Some(tracker) = &mut self.tracker {
            tracker.lines.push(object);
        }
    }

    /// The statement line of `object` with its payer and the payer's line before it, if the
    /// object is held and has a line.
    fn line(&self, object: EntryObject) -> Option<(PayerId, Entry, Option<EntryObject>)> {
        let (payer, currency, credit, amount, created_at, line) = match object {
            EntryObject::Payment(id) => {
                let row = self.payment_row(id)?;
                let p = &row.payment;
                (
                    p.payer,
                    p.currency,
                    false,
                    p.amount,
                    p.created_at,
                    row.line?,
                )
            }
            EntryObject::Topup(id) => {
                let row = self.topups.get(&id)?;
                let t = &row.topup;
                (t.payer, t.currency, true, t.amount, t.created_at, row.line?)
            }
            EntryObject::Refund(id) => {
                let row = self.refunds.get(&id)?;
                let r = &row.refund;
                (r.payer, r.currency, true, r.amount, r.created_at, row.line?)
            }
        };
        let entry = Entry {
            object,
            currency,
            credit,
            amount,
            balance_after: line.balance_after,
            created_at,
        };
        Some((payer, entry, line.previous))
    }

    // Queries.

    /// How `command` would be refused if it were applied now, from the checks it makes
    /// before it moves money; `None` when it might succeed. Reads only: a server answers such
    /// a refusal without recording anything, since a refusal that changes nothing can be
    /// answered as of any moment its state was current. Checks needing ids not yet chosen
    /// (collisions) are left to [`State::apply`].
    pub fn refusal(&self, command: &Command) -> Option<Rejection> {
        match command {
            Command::Pay(pay) => {
                if self.parties.merchant(pay.merchant).is_none() {
                    return Some(Rejection::MerchantNotFound);
                }
                if self.parties.payer(pay.payer).is_none() {
                    return Some(Rejection::PayerNotFound);
                }
                if pay.amount.is_zero() {
                    return Some(Rejection::AmountNotPositive);
                }
                let wallet = self.accounts.get(&(Owner::Payer(pay.payer), pay.currency));
                match wallet {
                    None => Some(Rejection::InsufficientFunds),
                    Some(&wallet) if self.certainly_short(wallet, pay) => {
                        Some(Rejection::InsufficientFunds)
                    }
                    Some(_) => None,
                }
            }
            Command::Topup {
                payer,
                amount,
                source,
                ..
            } => {
                if self.parties.payer(*payer).is_none() {
                    Some(Rejection::PayerNotFound)
                } else if amount.is_zero() {
                    Some(Rejection::AmountNotPositive)
                } else if *source == FundingSource::SandboxDecline {
                    Some(Rejection::FundingDeclined)
                } else {
                    None
                }
            }
            Command::Refund {
                payment,
                amount,
                caller,
                ..
            } => {
                let Some(row) = self.payment_row(*payment) else {
                    return Some(Rejection::PaymentNotFound);
                };
                let allowed = match caller {
                    Principal::Operator => true,
                    Principal::Merchant(merchant) => *merchant == row.payment.merchant,
                    Principal::Payer(_) => false,
                };
                if !allowed {
                    return Some(Rejection::PaymentNotFound);
                }
                let remaining = row
                    .payment
                    .amount
                    .checked_sub(row.payment.amount_refunded)
                    .expect("refunds never exceed the payment");
                let amount = amount.unwrap_or(remaining);
                (amount.is_zero() || amount > remaining).then_some(Rejection::RefundExceedsPayment)
            }
            _ => None,
        }
    }

    pub fn principal(&self, key_hash: &KeyHash) -> Option<Principal> {
        self.parties.principal(key_hash)
    }

    pub fn has_operator_key(&self) -> bool {
        self.parties.operator_key().is_some()
    }

    pub fn idempotency_lookup(
        &self,
        key: &IdempotencyKey,
        fingerprint: &[u8; 32],
    ) -> IdempotencyLookup<'_> {
        self.idempotency.lookup(key, fingerprint)
    }

    pub fn merchant(&self, id: MerchantId) -> Option<&Merchant> {
        self.parties.merchant(id)
    }

    pub fn payer(&self, id: PayerId) -> Option<&Payer> {
        self.parties.payer(id)
    }

    pub fn merchant_count(&self) -> usize {
        self.parties.merchant_count()
    }

    pub fn payer_count(&self) -> usize {
        self.parties.payer_count()
    }

    pub fn payment_count(&self) -> usize {
        self.payments.len()
    }

    pub fn payment(&self, id: PaymentId) -> Option<&Payment> {
        self.payment_row(id).map(|row| &row.payment)
    }

    fn payment_row(&self, id: PaymentId) -> Option<&PaymentRow> {
        self.payment_index
            .get(&id)
            .map(|&index| &self.payments[index])
    }

    pub fn refund_record(&self, id: RefundId) -> Option<&Refund> {
        self.refunds.get(&id).map(|row| &row.refund)
    }

    pub fn topup_record(&self, id: TopupId) -> Option<&Topup> {
        self.topups.get(&id).map(|row| &row.topup)
    }

    /// Available balances of a payer's wallets, by currency.
    pub fn payer_balances(&self, id: PayerId) -> Option<Vec<(Currency, i128)>> {
        let lists = self.payer_lists.get(&id)?;
        Some(self.balances(lists))
    }

    /// Available balances of a merchant, by currency.
    pub fn merchant_balances(&self, id: MerchantId) -> Option<Vec<(Currency, i128)>> {
        let lists = self.merchant_lists.get(&id)?;
        Some(self.balances(lists))
    }

    fn balances(&self, lists: &PartyLists) -> Vec<(Currency, i128)> {
        let mut out: Vec<(Currency, i128)> = lists
            .accounts
            .iter()
            .map(|(currency, account)| {
                let account = self
                    .ledger
                    .account(*account)
                    .expect("listed accounts exist");
                (*currency, account.available())
            })
            .collect();
        out.sort_by_key(|(currency, _)| *currency);
        out
    }

    /// Payments visible to `principal`, newest first, after the payment `starting_after`.
    /// `None` when the cursor is not a payment the principal may see.
    pub fn list_payments(
        &self,
        principal: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> Option<Page<&Payment>> {
        // Each list is a chain from its newest payment; a page starts at the list's head, or
        // at the payment before the cursor in that list.
        let next: fn(&PaymentRow) -> Option<PaymentId> = match principal {
            Principal::Operator => |row| row.previous,
            Principal::Payer(_) => |row| row.previous_of_payer,
            Principal::Merchant(_) => |row| row.previous_of_merchant,
        };
        let start = match starting_after {
            None => match principal {
                Principal::Operator => self.newest_payment,
                Principal::Payer(payer) => self.payer_lists.get(&payer)?.newest_payment,
                Principal::Merchant(merchant) => self.merchant_lists.get(&merchant)?.newest_payment,
            },
            Some(cursor) => {
                let row = self.payment_row(cursor)?;
                if !Self::may_see(principal, &row.payment) {
                    return None;
                }
                next(row)
            }
        };
        let mut items = Vec::new();
        let mut at = start;
        while let Some(id) = at {
            if items.len() == limit {
                break;
            }
            let row = self.payment_row(id).expect("a listed payment is held");
            items.push(&row.payment);
            at = next(row);
        }
        Some(Page {
            items,
            has_more: at.is_some(),
        })
    }

    /// Whether `principal` may see `payment`.
    pub fn may_see(principal: Principal, payment: &Payment) -> bool {
        match principal {
            Principal::Operator => true,
            Principal::Payer(payer) => payment.payer == payer,
            Principal::Merchant(merchant) => payment.merchant == merchant,
        }
    }

    /// A payer's statement, newest first, after the entry for object `starting_after`.
    /// `None` when the payer or the cursor is unknown.
    pub fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> Option<Page<Entry>> {
        let lists = self.payer_lists.get(&payer)?;
        let start = match starting_after {
            None => lists.newest_line,
            Some(object) => {
                let (owner, _, previous) = self.line(object)?;
                (owner == payer).then_some(previous)?
            }
        };
        let mut items = Vec::new();
        let mut at = start;
        while let Some(object) = at {
            if items.len() == limit {
                break;
            }
            let (_, entry, previous) = self.line(object).expect("a listed line is held");
            items.push(entry);
            at = previous;
        }
        Some(Page {
            items,
            has_more: at.is_some(),
        })
    }

    /// Per-currency sums over every account: money is conserved when every sum is zero.
    pub fn currency_totals(&self) -> Vec<CurrencyTotals> {
        let mut totals: HashMap<Currency, CurrencyTotals> = HashMap::new();
        for account in self.ledger.accounts() {
            let entry = totals.entry(account.currency).or_insert(CurrencyTotals {
                currency: account.currency,
                posted_net: 0,
                pending_net: 0,
                accounts: 0,
            });
            entry.posted_net += account.posted_balance();
            entry.pending_net +=
                i128::from(account.credits_pending) - i128::from(account.debits_pending);
            entry.accounts += 1;
        }
        let mut out: Vec<CurrencyTotals> = totals.into_values().collect();
        out.sort_by_key(|t| t.currency);
        out
    }

    /// Every ledger account (for audits and copies).
    pub fn ledger_accounts(&self) -> impl Iterator<Item = &Account> {
        self.ledger.accounts()
    }

    pub fn ledger_transfer_count(&self) -> usize {
        self.ledger.transfer_count()
    }
}

/// Working sets: what a record reads, loading objects into a state that holds only those, and
/// the changes applying made (ADR 0002). A whole state (the embedded store's) never tracks
/// changes, and none of this runs on its path.
impl State {
    /// What applying `record` reads; see [`Needs`].
    ///
    /// A refund names only its payment; the payment names its payer, its merchant and its
    /// currency, hence the accounts. So `self` answers for the payments it holds: a loader asks
    /// a working set, loads what is listed, and asks again while the answer is
    /// [`Needs::incomplete`] and lists something new (two rounds at most). Asked of a whole
    /// state, the answer is complete at once.
    pub fn needs(&self, record: &Record) -> Needs {
        let mut needs = Needs::default();
        if let Some(claim) = &record.idempotency {
            needs.idempotency_keys.push(claim.key.clone());
        }
        match &record.command {
            Command::SetOperatorKey { key_hash } => {
                needs.operator_key = true;
                needs.key_hashes.push(*key_hash);
            }
            Command::CreateMerchant { id, key_hash, .. } => {
                needs.merchants.push(*id);
                needs.key_hashes.push(*key_hash);
            }
            Command::CreatePayer { id, key_hash, .. } => {
                needs.payers.push(*id);
                needs.key_hashes.push(*key_hash);
            }
            Command::Topup {
                id,
                payer,
                currency,
                transfer_id,
                ..
            } => {
                needs.payers.push(*payer);
                needs.topups.push(*id);
                needs.accounts.extend([
                    (Owner::ExternalFunding, *currency),
                    (Owner::Payer(*payer), *currency),
                ]);
                needs.transfers.push(*transfer_id);
            }
            Command::Pay(pay) => needs.add_pay(pay),
            Command::PayBatch(items) => {
                for pay in items {
                    needs.add_pay(pay);
                }
            }
            Command::Refund {
                id,
                payment,
                transfer_ids,
                ..
            } => {
                needs.payments.push(*payment);
                needs.refunds.push(*id);
                needs.transfers.extend(transfer_ids);
                match self.payment(*payment) {
                    Some(payment) => {
                        // The statement line goes to the payer; the money moves between the
                        // payment's three accounts.
                        needs.payers.push(payment.payer);
                        needs.accounts.extend([
                            (Owner::Payer(payment.payer), payment.currency),
                            (Owner::Merchant(payment.merchant), payment.currency),
                            (Owner::PlatformFees, payment.currency),
                        ]);
                    }
                    None => needs.incomplete = true,
                }
            }
            // A prune reads nothing: keys a working set holds are forgotten as in a whole
            // state, and the store forgets the rest by their age (`Changes::prunes`).
            Command::PruneIdempotencyKeys { .. } => {}
            Command::Import(items) => needs.add_import(items),
        }
        needs.normalize();
        needs
    }

    /// An empty state that tracks what applying records changes, to be filled with the loaded
    /// objects a batch needs (the `insert_*` methods) and then applied to.
    ///
    /// A working set answers queries only about what it holds, and its lists and statements
    /// hold only what was applied to it.
    pub fn new_working_set() -> State {
        let mut state = State::new();
        state.track_changes();
        state
    }

    /// Starts tracking changes from here on, if not already.
    pub fn track_changes(&mut self) {
        if self.tracker.is_none() {
            self.idempotency.track_changes();
            self.parties.track_changes();
            self.tracker = Some(Box::new(Tracker {
                transfers_seen: self.ledger.transfer_count(),
                ..Tracker::default()
            }));
        }
    }

    /// Whether this state tracks its changes.
    pub fn is_tracking_changes(&self) -> bool {
        self.tracker.is_some()
    }

    /// What applying records changed since tracking began or the last call; empty for a state
    /// that does not track changes.
    pub fn take_changes(&mut self) -> Changes {
        let transfers_now = self.ledger.transfer_count();
        let Some(tracker) = &mut self.tracker else {
            return Changes::default();
        };
        let taken = std::mem::replace(
            &mut **tracker,
            Tracker {
                transfers_seen: transfers_now,
                ..Tracker::default()
            },
        );
        let account = |state: &State, id: AccountId| -> Account {
            *state.ledger.account(id).expect("a tracked account exists")
        };
        let mut created_ids = HashSet::new();
        let accounts_created = taken
            .accounts_created
            .iter()
            .map(|key| {
                let id = self.accounts[key];
                created_ids.insert(id);
                (key.0, account(self, id))
            })
            .collect();
        let transfers: Vec<TransferRecord> =
            self.ledger.transfer_records()[taken.transfers_seen..].to_vec();
        // Only an applied transfer changes totals; a failed one is recorded and moves nothing,
        // and an imported one moved its money before (the imported totals hold it).
        let changed: BTreeSet<AccountId> = transfers
            .iter()
            .filter(|record| {
                record.outcome.is_ok() && !taken.imported_transfers.contains(&record.transfer.id)
            })
            .flat_map(|record| [record.transfer.debit, record.transfer.credit])
            .filter(|id| !created_ids.contains(id))
            .collect();
        let account_totals = changed.into_iter().map(|id| account(self, id)).collect();

        let new_payment_ids: HashSet<PaymentId> = taken.payments.iter().copied().collect();
        let refunded: BTreeSet<PaymentId> = taken
            .refunded
            .iter()
            .copied()
            .filter(|id| !new_payment_ids.contains(id))
            .collect();
        let payments_refunded = refunded
            .into_iter()
            .map(|id| {
                let payment = &self
                    .payment_row(id)
                    .expect("a refunded payment exists")
                    .payment;
                PaymentRefunded {
                    id,
                    amount_refunded: payment.amount_refunded,
                    fee_refunded: payment.fee_refunded,
                }
            })
            .collect();
        let topups = taken
            .topups
            .iter()
            .map(|id| self.topups[id].topup.clone())
            .collect();
        let refunds = taken
            .refunds
            .iter()
            .map(|id| self.refunds[id].refund.clone())
            .collect();
        let payments = taken
            .payments
            .iter()
            .map(|id| self.payments[self.payment_index[id]].payment.clone())
            .collect();
        // By payer, each payer's in the order made.
        let mut entries: Vec<(PayerId, Entry)> = taken
            .lines
            .iter()
            .map(|object| {
                let (payer, entry, _) = self.line(*object).expect("a new line is held");
                (payer, entry)
            })
            .collect();
        entries.sort_by_key(|(payer, _)| *payer);

        let parties = self.parties.take_changes();
        let (idempotency, prunes) = self.idempotency.take_changes();

        Changes {
            operator_key: parties.operator_key,
            keys: parties.keys,
            merchants: parties.merchants,
            payers: parties.payers,
            accounts_created,
            account_totals,
            topups,
            payments,
            payments_refunded,
            refunds,
            entries,
            transfers,
            idempotency,
            prunes,
        }
    }

    // Loading: each puts one stored object into a working set. Parties go in before their
    // accounts, so that their balances list them.

    /// Loads a key hash and whose it is. The operator's key is the operator key.
    pub fn insert_key(&mut self, key_hash: KeyHash, principal: Principal) -> Result<(), LoadError> {
        self.parties.load_key(key_hash, principal)
    }

    /// Loads a merchant, fee schedule included.
    pub fn insert_merchant(&mut self, merchant: Merchant) -> Result<(), LoadError> {
        let id = merchant.id;
        self.parties.load_merchant(merchant)?;
        self.merchant_lists.insert(id, PartyLists::new());
        Ok(())
    }

    pub fn insert_payer(&mut self, payer: Payer) -> Result<(), LoadError> {
        let id = payer.id;
        self.parties.load_payer(payer)?;
        self.payer_lists.insert(id, PartyLists::new());
        Ok(())
    }

    /// Loads `owner`'s account with its totals. Its id, kind and currency must be those
    /// `owner` and the account's currency give.
    pub fn insert_account(&mut self, owner: Owner, account: Account) -> Result<(), LoadError> {
        let key = (owner, account.currency);
        if account.id != account_id(owner, account.currency) || account.kind != owner.account_kind()
        {
            return Err(LoadError::BadId);
        }
        if self.accounts.contains_key(&key) || self.ledger.account(account.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        self.ledger
            .insert_account(account)
            .map_err(|_| LoadError::BadId)?;
        self.accounts.insert(key, account.id);
        let lists = match owner {
            Owner::Payer(payer) => self.payer_lists.get_mut(&payer),
            Owner::Merchant(merchant) => self.merchant_lists.get_mut(&merchant),
            Owner::PlatformFees | Owner::ExternalFunding => None,
        };
        if let Some(lists) = lists {
            lists.accounts.push((account.currency, account.id));
        }
        Ok(())
    }

    /// Loads a payment, refund totals included.
    pub fn insert_payment(&mut self, payment: Payment) -> Result<(), LoadError> {
        if self.payment_index.contains_key(&payment.id) {
            return Err(LoadError::AlreadyLoaded);
        }
        // A loaded payment is in no list of the working set: its lists are the store's.
        self.payment_index.insert(payment.id, self.payments.len());
        self.payments.push(PaymentRow {
            payment,
            previous_of_payer: None,
            previous_of_merchant: None,
            previous: None,
            line: None,
        });
        Ok(())
    }

    pub fn insert_topup(&mut self, topup: Topup) -> Result<(), LoadError> {
        if self.topups.contains_key(&topup.id) {
            return Err(LoadError::AlreadyLoaded);
        }
        self.topups.insert(topup.id, TopupRow { topup, line: None });
        Ok(())
    }

    pub fn insert_refund(&mut self, refund: Refund) -> Result<(), LoadError> {
        if self.refunds.contains_key(&refund.id) {
            return Err(LoadError::AlreadyLoaded);
        }
        self.refunds
            .insert(refund.id, RefundRow { refund, line: None });
        Ok(())
    }

    /// Loads a ledger transfer record, failed ones included.
    pub fn insert_transfer_record(&mut self, record: TransferRecord) -> Result<(), LoadError> {
        if self.ledger.transfer(record.transfer.id).is_some() {
            return Err(LoadError::AlreadyLoaded);
        }
        if let Some(tracker) = &self.tracker
            && tracker.transfers_seen != self.ledger.transfer_count()
        {
            return Err(LoadError::ChangesPending);
        }
        self.ledger
            .insert_transfer_record(record)
            .map_err(|_| LoadError::BadId)?;
        if let Some(tracker) = &mut self.tracker {
            tracker.transfers_seen = self.ledger.transfer_count();
        }
        Ok(())
    }

    /// Loads an idempotency key's stored answer. Records may come in any order: pruning goes
    /// by the time each was made.
    pub fn insert_idempotency_record(&mut self, row: IdempotencyRow) -> Result<(), LoadError> {
        if self.idempotency.load(row) {
            Ok(())
        } else {
            Err(LoadError::AlreadyLoaded)
        }
    }

    // Reading objects out, to copy them into a working set.

    /// The operator's key hash, if one is set.
    pub fn operator_key(&self) -> Option<KeyHash> {
        self.parties.operator_key()
    }

    /// `owner`'s account in `currency`, with its totals, if it has one.
    pub fn account_of(&self, owner: Owner, currency: Currency) -> Option<Account> {
        let id = self.accounts.get(&(owner, currency))?;
        self.ledger.account(*id).copied()
    }

    /// The ledger's record of a transfer id.
    pub fn transfer_record(&self, id: TransferId) -> Option<TransferRecord> {
        self.ledger.transfer(id).copied()
    }

    /// An idempotency key's stored answer, if the key is held.
    pub fn idempotency_record(&self, key: &IdempotencyKey) -> Option<IdempotencyRow> {
        self.idempotency.row(key)
    }
}

/// The ledger id of `owner`'s account in `currency`: a 64-bit mix of both. Owner ids are
/// random 128-bit values chosen by the server, never by callers, so a fast mixing function
/// spreads them as well as a cryptographic hash would; collisions are still checked.
pub fn account_id(owner: Owner, currency: Currency) -> AccountId {
    use std::hash::Hasher;
    let (kind, id) = match owner {
        Owner::Payer(payer) => (1u8, payer.to_u128()),
        Owner::Merchant(merchant) => (2, merchant.to_u128()),
        Owner::PlatformFees => (3, 0),
        Owner::ExternalFunding => (4, 0),
    };
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
fn chain_failure(outcomes: &[Result<(), TransferRejection>]) -> Option<TransferRejection> {
    let mut failures = outcomes.iter().filter_map(|outcome| outcome.err());
    let first = failures.next()?;
    Some(
        std::iter::once(first)
            .chain(failures)
            .find(|rejection| *rejection != TransferRejection::LinkedEventFailed)
            .unwrap_or(first),
    )
}

fn ledger_rejection(rejection: TransferRejection) -> Rejection {
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
