//! The embedded store's answers to the API's questions, read from the state in this process.
//! The state holds only what is durable: the writer applies records after appending them.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use farthing_ledger::{Currency, Timestamp};
use farthing_payments::disk::DiskError;
use farthing_payments::{
    EntryObject, KeyHash, MerchantId, Page, PayerId, Payment, PaymentId, Principal, State,
    StoredRow,
};
use farthing_store::{Reads, StatementPage, StoreError, StoreFuture};

/// [`Reads`] over the embedded store's state.
pub(crate) struct StateReads(pub(crate) Arc<RwLock<State>>);

impl StateReads {
    fn state(&self) -> RwLockReadGuard<'_, State> {
        self.0
            .read()
            .expect("the writer never panics holding the lock")
    }
}

/// An answer that is ready at once.
fn ready<'a, T: Send + 'a>(value: Result<T, DiskError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(value.map_err(StoreError::from)))
}

impl Reads for StateReads {
    fn principal<'a>(&'a self, key_hash: &'a KeyHash) -> StoreFuture<'a, Option<Principal>> {
        ready(self.state().principal(key_hash))
    }

    fn has_operator_key(&self) -> StoreFuture<'_, bool> {
        ready(Ok(self.state().has_operator_key()))
    }

    fn payer_balances(&self, id: PayerId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>> {
        ready(self.state().payer_balances(id))
    }

    fn merchant_balances(&self, id: MerchantId) -> StoreFuture<'_, Option<Vec<(Currency, i128)>>> {
        ready(self.state().merchant_balances(id))
    }

    fn payment(&self, id: PaymentId) -> StoreFuture<'_, Option<Payment>> {
        ready(self.state().payment(id))
    }

    fn row(&self, tag: u8, id: u128) -> StoreFuture<'_, Option<StoredRow>> {
        ready(self.state().row(tag, id))
    }

    fn next_hold_deadline(&self) -> StoreFuture<'_, Option<Timestamp>> {
        ready(Ok(self.state().next_hold_deadline()))
    }

    fn list_payments(
        &self,
        principal: Principal,
        limit: usize,
        starting_after: Option<PaymentId>,
    ) -> StoreFuture<'_, Option<Page<Payment>>> {
        ready(self.state().list_payments(principal, limit, starting_after))
    }

    fn payer_entries(
        &self,
        payer: PayerId,
        limit: usize,
        starting_after: Option<EntryObject>,
    ) -> StoreFuture<'_, StatementPage> {
        let state = self.state();
        let page = match state.payer_exists(payer) {
            Ok(false) => Ok(StatementPage::UnknownPayer),
            Ok(true) => state
                .payer_entries(payer, limit, starting_after)
                .map(|page| match page {
                    Some(page) => StatementPage::Page(page),
                    None => StatementPage::UnknownCursor,
                }),
            Err(error) => Err(error),
        };
        ready(page)
    }
}
