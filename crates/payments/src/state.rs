//! The state machine: applies [`Record`]s and answers queries.

use std::collections::{HashMap, VecDeque};

use farthing_ledger::{
    Account, AccountId, AccountKind, Amount, Currency, IdHashBuilder, Ledger, Timestamp, Transfer,
    TransferId, TransferKind, TransferRejection,
};

use crate::ids::{MerchantId, PayerId, PaymentId, RefundId, TopupId};
use crate::model::*;

/// Whose money an account holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Owner {
    Payer(PayerId),
    Merchant(MerchantId),
    PlatformFees,
    ExternalFunding,
}

/// Where an object sits in the lists that show it, newest last.
#[derive(Clone, Copy, Debug, Default)]
struct Positions {
    payer: usize,
    merchant: usize,
    /// In the payer's statement.
    entry: usize,
}

struct PaymentRow {
    payment: Payment,
    positions: Positions,
}

struct PartyLists {
    payments: Vec<PaymentId>,
    entries: Vec<Entry>,
    accounts: Vec<(Currency, AccountId)>,
}

impl PartyLists {
    fn new() -> PartyLists {
        PartyLists {
            payments: Vec::new(),
            entries: Vec::new(),
            accounts: Vec::new(),
        }
    }
}

struct IdempotencyRecord {
    fingerprint: [u8; 32],
    outcome: Outcome,
}

/// The result of looking up an idempotency key before doing any work.
#[derive(Debug, PartialEq, Eq)]
pub enum IdempotencyLookup<'a> {
    /// Never seen (or forgotten): go ahead.
    New,
    /// Seen with the same request: answer with this.
    Replay(&'a Outcome),
    /// Seen with a different request.
    Reused,
}

/// A page of a list, newest first.
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
    operator_key: Option<KeyHash>,
    keys: HashMap<KeyHash, Principal>,
    merchants: HashMap<MerchantId, (Merchant, PartyLists), IdHashBuilder>,
    payers: HashMap<PayerId, (Payer, PartyLists), IdHashBuilder>,
    accounts: HashMap<(Owner, Currency), AccountId, IdHashBuilder>,
    /// Payments in the order they were made. Rows live in one growing vector and the map
    /// holds only their positions: inserting into a hash table of large rows touches a random
    /// page per insert, which cost more than all the rest of a payment.
    payments: Vec<PaymentRow>,
    payment_index: HashMap<PaymentId, usize, IdHashBuilder>,
    topups: HashMap<TopupId, (Topup, usize), IdHashBuilder>,
    refunds: HashMap<RefundId, (Refund, usize), IdHashBuilder>,
    idempotency: HashMap<IdempotencyKey, IdempotencyRecord>,
    /// Keys in the order they were made, for pruning.
    idempotency_order: VecDeque<(Timestamp, IdempotencyKey)>,
    records_applied: u64,
    /// The latest time of any record applied.
    last_time: Timestamp,
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
            operator_key: None,
            keys: HashMap::new(),
            merchants: HashMap::default(),
            payers: HashMap::default(),
            accounts: HashMap::default(),
            payments: Vec::new(),
            payment_index: HashMap::default(),
            topups: HashMap::default(),
            refunds: HashMap::default(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            records_applied: 0,
            last_time: Timestamp(0),
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
            self.idempotency.insert(
                claim.key.clone(),
                IdempotencyRecord {
                    fingerprint: claim.fingerprint,
                    outcome: outcome.clone(),
                },
            );
            self.idempotency_order
                .push_back((record.now, claim.key.clone()));
        }
        outcome
    }

    fn execute(&mut self, now: Timestamp, command: &Command) -> Outcome {
        match command {
            Command::SetOperatorKey { key_hash } => {
                if let Some(old) = self.operator_key.replace(*key_hash) {
                    self.keys.remove(&old);
                }
                self.keys.insert(*key_hash, Principal::Operator);
                Outcome::OperatorKeySet
            }
            Command::CreateMerchant {
                id,
                name,
                key_hash,
                fee,
            } => {
                if self.merchants.contains_key(id) || self.keys.contains_key(key_hash) {
                    return Outcome::Rejected(Rejection::IdCollision);
                }
                let merchant = Merchant {
                    id: *id,
                    name: name.clone(),
                    fee: *fee,
                    created_at: now,
                };
                self.keys.insert(*key_hash, Principal::Merchant(*id));
                self.merchants
                    .insert(*id, (merchant.clone(), PartyLists::new()));
                Outcome::MerchantCreated(merchant)
            }
            Command::CreatePayer { id, name, key_hash } => {
                if self.payers.contains_key(id) || self.keys.contains_key(key_hash) {
                    return Outcome::Rejected(Rejection::IdCollision);
                }
                let payer = Payer {
                    id: *id,
                    name: name.clone(),
                    created_at: now,
                };
                self.keys.insert(*key_hash, Principal::Payer(*id));
                self.payers.insert(*id, (payer.clone(), PartyLists::new()));
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
                let mut keys = 0;
                while let Some((made, _)) = self.idempotency_order.front() {
                    if *made >= *before {
                        break;
                    }
                    let (_, key) = self.idempotency_order.pop_front().expect("front exists");
                    self.idempotency.remove(&key);
                    keys += 1;
                }
                Outcome::Pruned { keys }
            }
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
        let kind = match owner {
            Owner::Payer(_) => AccountKind::PayerWallet,
            Owner::Merchant(_) => AccountKind::Merchant,
            Owner::PlatformFees => AccountKind::PlatformFees,
            Owner::ExternalFunding => AccountKind::ExternalFunding,
        };
        self.ledger
            .create_account(id, kind, currency)
            .expect("a fresh account id is free");
        self.accounts.insert((owner, currency), id);
        match owner {
            Owner::Payer(payer) => {
                if let Some((_, lists)) = self.payers.get_mut(&payer) {
                    lists.accounts.push((currency, id));
                }
            }
            Owner::Merchant(merchant) => {
                if let Some((_, lists)) = self.merchants.get_mut(&merchant) {
                    lists.accounts.push((currency, id));
                }
            }
            Owner::PlatformFees | Owner::ExternalFunding => {}
        }
        Ok(id)
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
        if !self.payers.contains_key(&payer) {
            return Outcome::Rejected(Rejection::PayerNotFound);
        }
        if self.topups.contains_key(&id) {
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
        let lists = &mut self.payers.get_mut(&payer).expect("checked above").1;
        lists.entries.push(Entry {
            object: EntryObject::Topup(id),
            currency,
            credit: true,
            amount,
            balance_after,
            created_at: now,
        });
        let position = lists.entries.len() - 1;
        self.topups.insert(id, (topup.clone(), position));
        Outcome::ToppedUp(topup)
    }

    fn pay(&mut self, now: Timestamp, pay: &PayCommand) -> Result<&Payment, Rejection> {
        let fee_schedule = match self.merchants.get(&pay.merchant) {
            Some((merchant, _)) => merchant.fee,
            None => return Err(Rejection::MerchantNotFound),
        };
        if !self.payers.contains_key(&pay.payer) {
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
        let payer_lists = &mut self.payers.get_mut(&pay.payer).expect("checked above").1;
        payer_lists.payments.push(pay.id);
        payer_lists.entries.push(Entry {
            object: EntryObject::Payment(pay.id),
            currency: pay.currency,
            credit: false,
            amount: pay.amount,
            balance_after,
            created_at: now,
        });
        let positions_payer = payer_lists.payments.len() - 1;
        let positions_entry = payer_lists.entries.len() - 1;
        let merchant_lists = &mut self.merchants.get_mut(&pay.merchant).expect("checked").1;
        merchant_lists.payments.push(pay.id);
        let positions_merchant = merchant_lists.payments.len() - 1;
        self.payment_index.insert(pay.id, self.payments.len());
        self.payments.push(PaymentRow {
            payment,
            positions: Positions {
                payer: positions_payer,
                merchant: positions_merchant,
                entry: positions_entry,
            },
        });
        Ok(&self.payments.last().expect("just pushed").payment)
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
        if self.refunds.contains_key(&id) {
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
        let lists = &mut self.payers.get_mut(&payment.payer).expect("payer exists").1;
        lists.entries.push(Entry {
            object: EntryObject::Refund(id),
            currency: payment.currency,
            credit: true,
            amount,
            balance_after,
            created_at: now,
        });
        let position = lists.entries.len() - 1;
        self.refunds.insert(id, (refund.clone(), position));
        Ok(refund)
    }

    // Queries.

    pub fn principal(&self, key_hash: &KeyHash) -> Option<Principal> {
        self.keys.get(key_hash).copied()
    }

    pub fn has_operator_key(&self) -> bool {
        self.operator_key.is_some()
    }

    pub fn idempotency_lookup(
        &self,
        key: &IdempotencyKey,
        fingerprint: &[u8; 32],
    ) -> IdempotencyLookup<'_> {
        match self.idempotency.get(key) {
            None => IdempotencyLookup::New,
            Some(record) if record.fingerprint == *fingerprint => {
                IdempotencyLookup::Replay(&record.outcome)
            }
            Some(_) => IdempotencyLookup::Reused,
        }
    }

    pub fn merchant(&self, id: MerchantId) -> Option<&Merchant> {
        self.merchants.get(&id).map(|(merchant, _)| merchant)
    }

    pub fn payer(&self, id: PayerId) -> Option<&Payer> {
        self.payers.get(&id).map(|(payer, _)| payer)
    }

    pub fn merchant_count(&self) -> usize {
        self.merchants.len()
    }

    pub fn payer_count(&self) -> usize {
        self.payers.len()
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
        self.refunds.get(&id).map(|(refund, _)| refund)
    }

    pub fn topup_record(&self, id: TopupId) -> Option<&Topup> {
        self.topups.get(&id).map(|(topup, _)| topup)
    }

    /// Available balances of a payer's wallets, by currency.
    pub fn payer_balances(&self, id: PayerId) -> Option<Vec<(Currency, i128)>> {
        let (_, lists) = self.payers.get(&id)?;
        Some(self.balances(lists))
    }

    /// Available balances of a merchant, by currency.
    pub fn merchant_balances(&self, id: MerchantId) -> Option<Vec<(Currency, i128)>> {
        let (_, lists) = self.merchants.get(&id)?;
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
        if principal == Principal::Operator {
            let end = match starting_after {
                None => self.payments.len(),
                Some(cursor) => *self.payment_index.get(&cursor)?,
            };
            let page = page_backwards(&self.payments[..end], limit);
            return Some(Page {
                items: page.items.into_iter().map(|row| &row.payment).collect(),
                has_more: page.has_more,
            });
        }
        let (ids, position_of): (&[PaymentId], fn(&Positions) -> usize) = match principal {
            Principal::Operator => unreachable!("answered above"),
            Principal::Payer(payer) => (&self.payers.get(&payer)?.1.payments, |p| p.payer),
            Principal::Merchant(merchant) => {
                (&self.merchants.get(&merchant)?.1.payments, |p| p.merchant)
            }
        };
        let end = match starting_after {
            None => ids.len(),
            Some(cursor) => {
                let row = self.payment_row(cursor)?;
                if !self.may_see(principal, &row.payment) {
                    return None;
                }
                position_of(&row.positions)
            }
        };
        let page = page_backwards(&ids[..end], limit);
        Some(Page {
            items: page
                .items
                .into_iter()
                .map(|id| {
                    &self
                        .payment_row(*id)
                        .expect("listed payments exist")
                        .payment
                })
                .collect(),
            has_more: page.has_more,
        })
    }

    /// Whether `principal` may see `payment`.
    pub fn may_see(&self, principal: Principal, payment: &Payment) -> bool {
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
        let (_, lists) = self.payers.get(&payer)?;
        let end = match starting_after {
            None => lists.entries.len(),
            Some(EntryObject::Payment(id)) => {
                let row = self.payment_row(id)?;
                (row.payment.payer == payer).then_some(row.positions.entry)?
            }
            Some(EntryObject::Topup(id)) => {
                let (topup, position) = self.topups.get(&id)?;
                (topup.payer == payer).then_some(*position)?
            }
            Some(EntryObject::Refund(id)) => {
                let (refund, position) = self.refunds.get(&id)?;
                (refund.payer == payer).then_some(*position)?
            }
        };
        let page = page_backwards(&lists.entries[..end], limit);
        Some(Page {
            items: page.items.into_iter().copied().collect(),
            has_more: page.has_more,
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

/// The ledger id of `owner`'s account in `currency`: a 64-bit mix of both. Owner ids are
/// random 128-bit values chosen by the server, never by callers, so a fast mixing function
/// spreads them as well as a cryptographic hash would; collisions are still checked.
fn account_id(owner: Owner, currency: Currency) -> AccountId {
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

/// The newest `limit` items of `items`, newest first.
fn page_backwards<T>(items: &[T], limit: usize) -> Page<&T> {
    let start = items.len().saturating_sub(limit);
    Page {
        items: items[start..].iter().rev().collect(),
        has_more: start > 0,
    }
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
