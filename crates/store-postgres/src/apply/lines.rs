//! Where a batch's statement lines are stored, and the `batch_position` of each new payment and
//! line.
//!
//! A payment's own line (the payer's debit of the payment's amount, at the payment's time) is
//! kept in the payment's row as its `balance_after`, and read back beside the others (the
//! `statement` view, and statement pages in `query`); every other line (top-ups, refunds,
//! captured holds) goes to `statement_lines`. That saves a row and an index entry per payment.
//!
//! Positions order rows of one time. The operator's and a merchant's lists order a batch's
//! payments by position, so payments' positions grow in the order they were made; a payer's
//! statement orders its lines from both tables by position, so within each payer they grow in
//! the order made too. Lines are given as `Changes::entries` gives them (by payer, then in the
//! order made), payments in the order made. With `S` one more than the lines kept apart, the
//! payment made `k`-th takes position `(k + 1)·S`, and so does its line; a payer's other lines
//! take the positions just after that payer's last payment line before them (or from 0 before
//! the first): at most `S − 1` of them, so they stay below the payer's next payment line.
//! When no line can be kept in a payment row, or the positions would not fit `INTEGER`, every
//! line goes to `statement_lines` and positions are 0, 1, 2, … as they were before rows held
//! lines.

use std::collections::HashMap;

use super::*;

/// The rows a batch writes for its payments and statement lines.
#[derive(PartialEq, Eq, Debug)]
pub(crate) struct Lines {
    /// For each new payment, in `Changes::payments` order: its `batch_position`, and the
    /// balance after its line when the line is kept in its row.
    pub(crate) payments: Vec<(i32, Option<i64>)>,
    /// The lines that go to `statement_lines`: their place in `Changes::entries`, and their
    /// `batch_position`.
    pub(crate) entries: Vec<(usize, i32)>,
}

impl Lines {
    /// Every line in `statement_lines`, positions in the order made.
    fn apart(changes: &Changes) -> Result<Lines, PgError> {
        Ok(Lines {
            payments: batch_positions(changes.payments.len())?
                .into_iter()
                .map(|position| (position, None))
                .collect(),
            entries: batch_positions(changes.entries.len())?
                .into_iter()
                .enumerate()
                .collect(),
        })
    }

    /// The plan for `changes`. Lines are kept in payment rows only for payments made at or
    /// after `made_from` (the `payment_lines` row; `None`: never).
    pub(crate) fn plan(changes: &Changes, made_from: Option<Timestamp>) -> Result<Lines, PgError> {
        let Some(made_from) = made_from else {
            return Lines::apart(changes);
        };
        // Payments that may hold their line: settled when made, at or after `made_from`.
        let candidates: HashMap<PaymentId, usize> = changes
            .payments
            .iter()
            .enumerate()
            .filter(|(_, payment)| payment.hold.is_none() && payment.created_at >= made_from)
            .map(|(k, payment)| (payment.id, k))
            .collect();
        if candidates.is_empty() {
            return Lines::apart(changes);
        }
        // Each entry's payment, when the entry is exactly that payment's own line.
        let mut taken = vec![false; changes.payments.len()];
        let in_row: Vec<Option<usize>> = changes
            .entries
            .iter()
            .map(|(payer, entry)| {
                let EntryObject::Payment(id) = entry.object else {
                    return None;
                };
                let k = *candidates.get(&id)?;
                let payment = &changes.payments[k];
                let own = payment.payer == *payer
                    && entry.currency == payment.currency
                    && !entry.credit
                    && entry.amount == payment.amount
                    && entry.created_at == payment.created_at
                    && !taken[k];
                if own {
                    taken[k] = true;
                }
                own.then_some(k)
            })
            .collect();
        let kept_apart = in_row.iter().filter(|k| k.is_none()).count();
        if kept_apart == changes.entries.len() {
            return Lines::apart(changes);
        }
        let step = kept_apart as i64 + 1;
        let Some(top) = (changes.payments.len() as i64 + 1).checked_mul(step) else {
            return Lines::apart(changes);
        };
        if top > i64::from(i32::MAX) {
            return Lines::apart(changes);
        }
        let position_of = |k: usize| ((k as i64 + 1) * step) as i32;
        let mut payments: Vec<(i32, Option<i64>)> = (0..changes.payments.len())
            .map(|k| (position_of(k), None))
            .collect();
        let mut entries = Vec::with_capacity(kept_apart);
        // Per payer: the least position its next line may take.
        let mut next_free: HashMap<PayerId, i32> = HashMap::new();
        for (index, ((payer, entry), in_row)) in changes.entries.iter().zip(&in_row).enumerate() {
            let free = next_free.entry(*payer).or_insert(0);
            let position = match in_row {
                Some(k) => {
                    let position = position_of(*k);
                    if position < *free {
                        // Not after the payer's lines before it: the entries are not in the
                        // order made.
                        return Lines::apart(changes);
                    }
                    payments[*k].1 = Some(big("a balance", entry.balance_after.micros())?);
                    position
                }
                None => {
                    entries.push((index, *free));
                    *free
                }
            };
            *free = position + 1;
        }
        Ok(Lines { payments, entries })
    }
}

/// The time from which payments keep their own lines (the `payment_lines` row), from
/// `forecast` when it has read it.
pub(super) async fn payment_lines_from(
    transaction: &Transaction<'_>,
    forecast: Option<&Forecast>,
) -> Result<Option<Timestamp>, PgError> {
    if let Some(from) = forecast.and_then(|forecast| forecast.payment_lines.get()) {
        return Ok(Some(*from));
    }
    let row = transaction
        .query_typed_opt("SELECT made_from FROM payment_lines", &[])
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let from = Timestamp(
        u64::try_from(row.try_get::<_, i64>(0)?)
            .map_err(|_| PgError::Stored("payment_lines.made_from is negative".into()))?,
    );
    if let Some(forecast) = forecast {
        let _ = forecast.payment_lines.set(from);
    }
    Ok(Some(from))
}

#[cfg(test)]
mod tests {
    use farthing_ledger::Amount;
    use farthing_payments::{Hold, HoldStatus, MerchantId, TopupId};

    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    fn payment(id: u128, payer: u128, amount: u64, at: u64) -> Payment {
        Payment {
            id: PaymentId::from_u128(id),
            payer: PayerId::from_u128(payer),
            merchant: MerchantId::from_u128(9),
            amount: Amount::from_micros(amount),
            currency: usd(),
            fee: Amount::ZERO,
            description: None,
            reference: None,
            created_at: Timestamp(at),
            amount_refunded: Amount::ZERO,
            fee_refunded: Amount::ZERO,
            hold: None,
        }
    }

    fn line(
        payer: u128,
        object: EntryObject,
        credit: bool,
        amount: u64,
        at: u64,
    ) -> (PayerId, Entry) {
        (
            PayerId::from_u128(payer),
            Entry {
                object,
                currency: usd(),
                credit,
                amount: Amount::from_micros(amount),
                balance_after: Amount::from_micros(1_000),
                created_at: Timestamp(at),
            },
        )
    }

    fn paid(id: u128, payer: u128, amount: u64, at: u64) -> (PayerId, Entry) {
        line(
            payer,
            EntryObject::Payment(PaymentId::from_u128(id)),
            false,
            amount,
            at,
        )
    }

    fn topped(id: u128, payer: u128, at: u64) -> (PayerId, Entry) {
        line(
            payer,
            EntryObject::Topup(TopupId::from_u128(id)),
            true,
            5,
            at,
        )
    }

    /// Every line's position, in `Changes::entries` order, wherever it is stored.
    fn line_positions(changes: &Changes, lines: &Lines) -> Vec<(PayerId, i32)> {
        let apart: HashMap<usize, i32> = lines.entries.iter().copied().collect();
        changes
            .entries
            .iter()
            .enumerate()
            .map(|(index, (payer, entry))| {
                let position = apart.get(&index).copied().unwrap_or_else(|| {
                    let EntryObject::Payment(id) = entry.object else {
                        panic!("line {index} is stored nowhere");
                    };
                    let k = changes.payments.iter().position(|p| p.id == id).unwrap();
                    assert!(
                        lines.payments[k].1.is_some(),
                        "line {index} is stored nowhere"
                    );
                    lines.payments[k].0
                });
                (*payer, position)
            })
            .collect()
    }

    /// Positions grow in the order made among payments, and within each payer among lines;
    /// every line is stored once.
    fn assert_ordered(changes: &Changes, lines: &Lines) {
        assert!(lines.payments.windows(2).all(|w| w[0].0 < w[1].0));
        let in_rows = lines.payments.iter().filter(|(_, b)| b.is_some()).count();
        assert_eq!(in_rows + lines.entries.len(), changes.entries.len());
        let mut last: HashMap<PayerId, i32> = HashMap::new();
        for (payer, position) in line_positions(changes, lines) {
            assert!(position >= 0);
            if let Some(before) = last.insert(payer, position) {
                assert!(before < position, "{payer:?}: {before} then {position}");
            }
        }
    }

    #[test]
    fn payment_lines_go_in_their_rows_and_every_payers_lines_keep_their_order() {
        // Payer 1: top-up, payment 10, top-up, payment 12, top-up; payer 2: payment 11, a held
        // payment 13 (no line), then a refund-like credit line.
        let mut held = payment(13, 2, 7, 100);
        held.hold = Some(Box::new(Hold {
            status: HoldStatus::Held,
            amount_authorized: Amount::from_micros(7),
            amount_captured: Amount::ZERO,
            fee_captured: Amount::ZERO,
            expires_at: Timestamp(200),
            resolved_at: None,
            transfers: [TransferId(1), TransferId(2), TransferId(3)],
        }));
        let changes = Changes {
            payments: vec![
                payment(10, 1, 3, 100),
                payment(11, 2, 4, 100),
                payment(12, 1, 5, 100),
                held,
            ],
            entries: vec![
                topped(1, 1, 100),
                paid(10, 1, 3, 100),
                topped(2, 1, 100),
                paid(12, 1, 5, 100),
                topped(3, 1, 100),
                paid(11, 2, 4, 100),
                line(
                    2,
                    EntryObject::Payment(PaymentId::from_u128(13)),
                    false,
                    7,
                    100,
                ),
            ],
            ..Changes::default()
        };
        let lines = Lines::plan(&changes, Some(Timestamp(0))).unwrap();
        assert_ordered(&changes, &lines);
        let in_rows: Vec<bool> = lines.payments.iter().map(|(_, b)| b.is_some()).collect();
        assert_eq!(in_rows, [true, true, true, false]);
        assert_eq!(
            lines.entries.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [0, 2, 4, 6]
        );
    }

    #[test]
    fn lines_stay_apart_before_the_cutover_and_when_they_are_not_the_payments_own() {
        let changes = Changes {
            payments: vec![payment(10, 1, 3, 100), payment(11, 1, 4, 100)],
            entries: vec![
                // Another amount, another payer, another time: not the payment's own line.
                paid(10, 1, 2, 100),
                paid(11, 2, 4, 100),
            ],
            ..Changes::default()
        };
        let apart = Lines::apart(&changes).unwrap();
        assert_eq!(Lines::plan(&changes, Some(Timestamp(0))).unwrap(), apart);
        let own = Changes {
            entries: vec![paid(10, 1, 3, 100), paid(11, 1, 4, 100)],
            ..changes
        };
        assert_eq!(
            Lines::plan(&own, None).unwrap(),
            Lines::apart(&own).unwrap()
        );
        assert_eq!(
            Lines::plan(&own, Some(Timestamp(101))).unwrap(),
            Lines::apart(&own).unwrap()
        );
        let kept = Lines::plan(&own, Some(Timestamp(100))).unwrap();
        assert_ordered(&own, &kept);
        assert!(kept.entries.is_empty());
        assert_eq!(kept.payments, [(1, Some(1_000)), (2, Some(1_000))]);
    }

    #[test]
    fn random_batches_keep_every_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for _ in 0..500 {
            let payers = 1 + next(5) as u128;
            let mut payments = Vec::new();
            let mut by_payer: HashMap<u128, Vec<(PayerId, Entry)>> = HashMap::new();
            for n in 0..next(30) {
                let payer = 1 + u128::from(next(payers as u64) as u8);
                let id = 1_000 + u128::from(n);
                if next(3) == 0 {
                    by_payer
                        .entry(payer)
                        .or_default()
                        .push(topped(id, payer, 100));
                } else {
                    let amount = 1 + next(9);
                    payments.push(payment(id, payer, amount, 100));
                    // Now and then a line that is not the payment's own.
                    let amount = if next(8) == 0 { amount + 1 } else { amount };
                    by_payer
                        .entry(payer)
                        .or_default()
                        .push(paid(id, payer, amount, 100));
                }
            }
            let mut payers: Vec<u128> = by_payer.keys().copied().collect();
            payers.sort();
            let entries = payers
                .into_iter()
                .flat_map(|payer| by_payer.remove(&payer).unwrap())
                .collect();
            let changes = Changes {
                payments,
                entries,
                ..Changes::default()
            };
            let lines = Lines::plan(&changes, Some(Timestamp(0))).unwrap();
            assert_ordered(&changes, &lines);
        }
    }
}
