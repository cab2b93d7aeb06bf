//! Writing a batch's changes back: one statement per table, sent together, then the large
//! tables' rows with binary `COPY`.

use super::*;

/// Whether [`persist`] wrote the change set.
#[derive(PartialEq, Eq, Debug)]
pub(super) enum Persisted {
    Written,
    /// One of the unwritten ids assumed free is taken: the rows sent in bulk were not.
    NewIdTaken,
}

/// Writes a change set, after checking that the `unwritten` ids assumed free are: first one
/// statement per table (and the check), all sent together, then the large tables' rows with
/// `COPY`, one table at a time. Only the statements on one table depend on each other's order
/// (the operator's key, and a prune before new idempotency records), and each such pair is
/// sent in order. The accounts are left for [`persist_accounts`] unless `with_accounts`.
pub(super) async fn persist(
    transaction: &Transaction<'_>,
    changes: &Changes,
    lines: &Lines,
    now: Timestamp,
    unwritten: (&BTreeSet<PaymentId>, &BTreeSet<TransferId>),
    with_accounts: bool,
) -> Result<Persisted, PgError> {
    let key_of: HashMap<Principal, &KeyHash> = changes
        .keys
        .iter()
        .filter_map(|(hash, principal)| principal.map(|p| (p, hash)))
        .collect();
    let (
        keys,
        merchants,
        payers,
        accounts,
        topups,
        payments,
        refunded,
        refunds,
        entries,
        transfers,
        resolved,
        rows,
        idempotency,
        taken,
        copies,
    ) = tokio::join!(
        biased;
        persist_keys(transaction, changes, now),
        persist_merchants(transaction, changes, &key_of),
        persist_payers(transaction, changes, &key_of),
        async {
            if with_accounts {
                persist_accounts(transaction, changes, now).await
            } else {
                Ok(())
            }
        },
        persist_topups(transaction, changes),
        persist_payments(transaction, changes, lines),
        persist_payments_refunded(transaction, changes),
        persist_refunds(transaction, changes),
        persist_entries(transaction, changes, lines),
        persist_transfers(transaction, &changes.transfers),
        persist_transfers_resolved(transaction, &changes.transfers_resolved),
        crate::kinds::upsert_stored(transaction, &changes.rows),
        persist_idempotency(transaction, changes),
        any_taken(transaction, unwritten.0, unwritten.1),
        prepare_copies(transaction, changes, lines),
    );
    let mut new_id_taken = false;
    let mut prepared = Vec::new();
    first_error([
        keys,
        merchants,
        payers,
        accounts,
        topups,
        payments,
        refunded,
        refunds,
        entries,
        transfers,
        resolved,
        rows,
        idempotency,
        taken.map(|taken| new_id_taken = taken),
        copies.map(|copies| prepared = copies),
    ])?;
    if new_id_taken {
        return Ok(Persisted::NewIdTaken);
    }
    // One at a time, and only once everything before succeeded: a `COPY` sent into a failed
    // transaction leaves the driver out of step with the server.
    for (statement, rows) in prepared {
        copy_in(transaction, &statement, rows).await?;
    }
    Ok(Persisted::Written)
}

/// The error that caused the others: statements sent together after a failed one fail only
/// because the transaction is aborted, and the order they were sent in is not the order
/// written here.
pub(super) fn first_error<const N: usize>(
    results: [Result<(), PgError>; N],
) -> Result<(), PgError> {
    let aborted = |error: &PgError| matches!(error, PgError::Postgres(e) if e.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    let mut first = None;
    for result in results {
        match result {
            Ok(()) => {}
            Err(error) if !aborted(&error) => return Err(error),
            Err(error) => {
                first.get_or_insert(error);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

pub(super) fn key_for(
    key_of: &HashMap<Principal, &KeyHash>,
    principal: Principal,
) -> Result<Vec<u8>, PgError> {
    key_of
        .get(&principal)
        .map(|hash| hash.0.to_vec())
        .ok_or_else(|| PgError::Stored(format!("no key hash for new {principal:?}")))
}

pub(super) async fn persist_merchants(
    transaction: &Transaction<'_>,
    changes: &Changes,
    key_of: &HashMap<Principal, &KeyHash>,
) -> Result<(), PgError> {
    if changes.merchants.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut names = Vec::new();
    let mut hashes = Vec::new();
    let mut bps = Vec::new();
    let mut fixed = Vec::new();
    let mut created = Vec::new();
    for merchant in &changes.merchants {
        ids.push(id16(merchant.id.to_u128()));
        names.push(merchant.name.as_str());
        hashes.push(key_for(key_of, Principal::Merchant(merchant.id))?);
        bps.push(i32::try_from(merchant.fee.bps).map_err(|_| stored("fee_bps"))?);
        fixed.push(merchant.fee.fixed.micros().to_string());
        created.push(big("a time", merchant.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO merchants (id, name, key_hash, fee_bps, fee_fixed, created_at)
             SELECT id, name, key_hash, fee_bps, fee_fixed::NUMERIC, created_at
             FROM unnest($1::UUID[], $2::TEXT[], $3::BYTEA[], $4::INTEGER[], $5::TEXT[],
                         $6::BIGINT[])
                  AS u(id, name, key_hash, fee_bps, fee_fixed, created_at)",
            &[
                (&ids, Type::UUID_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&hashes, Type::BYTEA_ARRAY),
                (&bps, Type::INT4_ARRAY),
                (&fixed, Type::TEXT_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_payers(
    transaction: &Transaction<'_>,
    changes: &Changes,
    key_of: &HashMap<Principal, &KeyHash>,
) -> Result<(), PgError> {
    if changes.payers.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut names = Vec::new();
    let mut hashes = Vec::new();
    let mut created = Vec::new();
    for payer in &changes.payers {
        ids.push(id16(payer.id.to_u128()));
        names.push(payer.name.as_str());
        hashes.push(key_for(key_of, Principal::Payer(payer.id))?);
        created.push(big("a time", payer.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO payers (id, name, key_hash, created_at)
             SELECT * FROM unnest($1::UUID[], $2::TEXT[], $3::BYTEA[], $4::BIGINT[])",
            &[
                (&ids, Type::UUID_ARRAY),
                (&names, Type::TEXT_ARRAY),
                (&hashes, Type::BYTEA_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_topups(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if changes.topups.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for topup in &changes.topups {
        c.id.push(id16(topup.id.to_u128()));
        c.payer.push(id16(topup.payer.to_u128()));
        c.amount.push(big("an amount", topup.amount.micros())?);
        c.currency.push(topup.currency.as_str().to_string());
        c.small.push(match topup.source {
            FundingSource::Sandbox => 1,
            FundingSource::SandboxDecline => 2,
        });
        c.created.push(big("a time", topup.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO topups (id, payer, amount, currency, source, created_at)
             SELECT * FROM unnest($1::UUID[], $2::UUID[], $3::BIGINT[], $4::TEXT[],
                                  $5::SMALLINT[], $6::BIGINT[])",
            &[
                (&c.id, Type::UUID_ARRAY),
                (&c.payer, Type::UUID_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.small, Type::INT2_ARRAY),
                (&c.created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_payments(
    transaction: &Transaction<'_>,
    changes: &Changes,
    lines: &Lines,
) -> Result<(), PgError> {
    let payments = &changes.payments;
    if payments.is_empty() {
        return Ok(());
    }
    if payments.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let (positions, balances): (Vec<i32>, Vec<Option<i64>>) =
        lines.payments.iter().copied().unzip();
    let mut c = Columns::default();
    let mut description = Vec::new();
    let mut reference = Vec::new();
    for payment in payments {
        c.id.push(id16(payment.id.to_u128()));
        c.payer.push(id16(payment.payer.to_u128()));
        c.merchant.push(id16(payment.merchant.to_u128()));
        c.amount.push(big("an amount", payment.amount.micros())?);
        c.currency.push(payment.currency.as_str().to_string());
        c.fee.push(big("a fee", payment.fee.micros())?);
        description.push(payment.description.as_deref());
        reference.push(payment.reference.as_deref());
        c.created.push(big("a time", payment.created_at.0)?);
        c.amount2
            .push(big("an amount", payment.amount_refunded.micros())?);
        c.fee2.push(big("a fee", payment.fee_refunded.micros())?);
    }
    transaction
        .execute_typed(
            "INSERT INTO payments (id, payer, merchant, amount, currency, fee, description,
                                   reference, created_at, amount_refunded, fee_refunded,
                                   batch_position, balance_after)
             SELECT * FROM unnest($1::UUID[], $2::UUID[], $3::UUID[], $4::BIGINT[],
                                  $5::TEXT[], $6::BIGINT[], $7::TEXT[], $8::TEXT[],
                                  $9::BIGINT[], $10::BIGINT[], $11::BIGINT[],
                                  $12::INTEGER[], $13::BIGINT[])",
            &[
                (&c.id, Type::UUID_ARRAY),
                (&c.payer, Type::UUID_ARRAY),
                (&c.merchant, Type::UUID_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
                (&description, Type::TEXT_ARRAY),
                (&reference, Type::TEXT_ARRAY),
                (&c.created, Type::INT8_ARRAY),
                (&c.amount2, Type::INT8_ARRAY),
                (&c.fee2, Type::INT8_ARRAY),
                (&positions, Type::INT4_ARRAY),
                (&balances, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_payments_refunded(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if changes.payments_refunded.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for change in &changes.payments_refunded {
        c.id.push(id16(change.id.to_u128()));
        c.amount
            .push(big("an amount", change.amount_refunded.micros())?);
        c.fee.push(big("a fee", change.fee_refunded.micros())?);
    }
    transaction
        .execute_typed(
            "UPDATE payments SET amount_refunded = u.amount_refunded,
                                 fee_refunded = u.fee_refunded
             FROM unnest($1::UUID[], $2::BIGINT[], $3::BIGINT[])
                  AS u(id, amount_refunded, fee_refunded)
             WHERE payments.id = u.id",
            &[
                (&c.id, Type::UUID_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_refunds(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if changes.refunds.is_empty() {
        return Ok(());
    }
    let mut c = Columns::default();
    for refund in &changes.refunds {
        c.id.push(id16(refund.id.to_u128()));
        c.id2.push(id16(refund.payment.to_u128()));
        c.payer.push(id16(refund.payer.to_u128()));
        c.merchant.push(id16(refund.merchant.to_u128()));
        c.amount.push(big("an amount", refund.amount.micros())?);
        c.currency.push(refund.currency.as_str().to_string());
        c.fee.push(big("a fee", refund.fee_refunded.micros())?);
        c.created.push(big("a time", refund.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO refunds (id, payment, payer, merchant, amount, currency,
                                  fee_refunded, created_at)
             SELECT * FROM unnest($1::UUID[], $2::UUID[], $3::UUID[], $4::UUID[],
                                  $5::BIGINT[], $6::TEXT[], $7::BIGINT[], $8::BIGINT[])",
            &[
                (&c.id, Type::UUID_ARRAY),
                (&c.id2, Type::UUID_ARRAY),
                (&c.payer, Type::UUID_ARRAY),
                (&c.merchant, Type::UUID_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&c.fee, Type::INT8_ARRAY),
                (&c.created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// The statement lines not kept in payment rows, with their positions (see [`Lines`]).
pub(super) async fn persist_entries(
    transaction: &Transaction<'_>,
    changes: &Changes,
    lines: &Lines,
) -> Result<(), PgError> {
    if lines.entries.is_empty() {
        return Ok(());
    }
    if lines.entries.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let positions: Vec<i32> = lines
        .entries
        .iter()
        .map(|(_, position)| *position)
        .collect();
    let mut c = Columns::default();
    let mut credit = Vec::new();
    for (payer, entry) in lines
        .entries
        .iter()
        .map(|(index, _)| &changes.entries[*index])
    {
        let (kind, id) = entry_object_columns(entry.object);
        c.payer.push(id16(payer.to_u128()));
        c.id.push(id16(id));
        c.small.push(kind);
        c.currency.push(entry.currency.as_str().to_string());
        credit.push(entry.credit);
        c.amount.push(big("an amount", entry.amount.micros())?);
        c.amount2
            .push(big("a balance", entry.balance_after.micros())?);
        c.created.push(big("a time", entry.created_at.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO statement_lines (payer, object_id, object_kind, currency, credit,
                                          amount, balance_after, created_at, batch_position)
             SELECT * FROM unnest($1::UUID[], $2::UUID[], $3::SMALLINT[], $4::TEXT[],
                                  $5::BOOLEAN[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[],
                                  $9::INTEGER[])",
            &[
                (&c.payer, Type::UUID_ARRAY),
                (&c.id, Type::UUID_ARRAY),
                (&c.small, Type::INT2_ARRAY),
                (&c.currency, Type::TEXT_ARRAY),
                (&credit, Type::BOOL_ARRAY),
                (&c.amount, Type::INT8_ARRAY),
                (&c.amount2, Type::INT8_ARRAY),
                (&c.created, Type::INT8_ARRAY),
                (&positions, Type::INT4_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// Prunes, then the new idempotency records (a key pruned and used again in one batch is new).
pub(super) async fn persist_idempotency(
    transaction: &Transaction<'_>,
    changes: &Changes,
) -> Result<(), PgError> {
    if let Some(before) = changes.prunes.iter().max() {
        transaction
            .execute_typed(
                "DELETE FROM idempotency_keys WHERE created_at < $1",
                &[(&big("a prune time", before.0)?, Type::INT8)],
            )
            .await?;
    }
    if changes.idempotency.is_empty() {
        return Ok(());
    }
    let mut kinds = Vec::new();
    let mut principals = Vec::new();
    let mut keys = Vec::new();
    let mut fingerprints = Vec::new();
    let mut outcomes = Vec::new();
    let mut created = Vec::new();
    for row in &changes.idempotency {
        let (kind, id) = principal_columns(row.key.principal);
        kinds.push(kind);
        principals.push(id);
        keys.push(row.key.key.as_str());
        fingerprints.push(row.fingerprint.as_slice());
        let mut outcome = Vec::new();
        encode_outcome(&row.outcome, &mut outcome);
        outcomes.push(outcome);
        created.push(big("a time", row.made.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO idempotency_keys (principal_kind, principal_id, key, fingerprint,
                                           outcome, created_at)
             SELECT * FROM unnest($1::SMALLINT[], $2::UUID[], $3::TEXT[], $4::BYTEA[],
                                  $5::BYTEA[], $6::BIGINT[])",
            &[
                (&kinds, Type::INT2_ARRAY),
                (&principals, Type::UUID_ARRAY),
                (&keys, Type::TEXT_ARRAY),
                (&fingerprints, Type::BYTEA_ARRAY),
                (&outcomes, Type::BYTEA_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}

/// A statement line's `object_kind` (1 top-up, 2 payment, 3 refund) and `object_id`.
pub(super) fn entry_object_columns(object: EntryObject) -> (i16, u128) {
    match object {
        EntryObject::Topup(id) => (1, id.to_u128()),
        EntryObject::Payment(id) => (2, id.to_u128()),
        EntryObject::Refund(id) => (3, id.to_u128()),
    }
}

/// `batch_position` for `count` rows in the order a batch made them: 0, 1, 2, …
pub(super) fn batch_positions(count: usize) -> Result<Vec<i32>, PgError> {
    let count = i32::try_from(count)
        .map_err(|_| PgError::Stored("a batch position does not fit INTEGER".into()))?;
    Ok((0..count).collect())
}

/// Column vectors shared by the set-based inserts.
#[derive(Default)]
pub(super) struct Columns {
    id: Vec<Id>,
    id2: Vec<Id>,
    payer: Vec<Id>,
    merchant: Vec<Id>,
    amount: Vec<i64>,
    amount2: Vec<i64>,
    fee: Vec<i64>,
    fee2: Vec<i64>,
    currency: Vec<String>,
    small: Vec<i16>,
    created: Vec<i64>,
}

/// Rows in the binary `COPY` format: a header, then each row as its field count and each field
/// as its length and its bytes in the type's binary form, then a trailer.
pub(super) struct CopyRows {
    buf: BytesMut,
    fields: i16,
}

impl CopyRows {
    fn new(fields: i16, capacity: usize) -> CopyRows {
        let mut buf = BytesMut::with_capacity(capacity + 32);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        CopyRows { buf, fields }
    }

    fn row(&mut self) {
        self.buf.put_i16(self.fields);
    }

    /// UUID: an object id, 16 bytes big-endian.
    fn id(&mut self, id: u128) {
        self.buf.put_i32(16);
        self.buf.put_u128(id);
    }

    fn int8(&mut self, value: i64) {
        self.buf.put_i32(8);
        self.buf.put_i64(value);
    }

    fn int4(&mut self, value: i32) {
        self.buf.put_i32(4);
        self.buf.put_i32(value);
    }

    fn int2(&mut self, value: i16) {
        self.buf.put_i32(2);
        self.buf.put_i16(value);
    }

    fn bool(&mut self, value: bool) {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(value));
    }

    /// TEXT or CHAR(n), in the database's encoding (UTF-8).
    fn text(&mut self, value: &str) {
        self.buf.put_i32(value.len() as i32);
        self.buf.put_slice(value.as_bytes());
    }

    fn optional_text(&mut self, value: Option<&str>) {
        match value {
            Some(value) => self.text(value),
            None => self.null(),
        }
    }

    fn null(&mut self) {
        self.buf.put_i32(-1);
    }

    /// NUMERIC: a non-negative integer as base-10,000 digits, most significant first.
    fn numeric(&mut self, value: u64) {
        let mut digits = [0i16; 5];
        let mut count = 0;
        let mut rest = value;
        while rest > 0 {
            digits[count] = (rest % 10_000) as i16;
            rest /= 10_000;
            count += 1;
        }
        self.buf.put_i32(8 + 2 * count as i32);
        self.buf.put_i16(count as i16); // ndigits
        self.buf.put_i16(count.saturating_sub(1) as i16); // weight
        self.buf.put_u16(0); // sign: positive
        self.buf.put_u16(0); // dscale
        for digit in digits[..count].iter().rev() {
            self.buf.put_i16(*digit);
        }
    }

    fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

/// Runs a prepared `COPY … FROM STDIN (FORMAT binary)` with `rows`.
pub(super) async fn copy_in(
    transaction: &Transaction<'_>,
    statement: &Statement,
    rows: Bytes,
) -> Result<(), PgError> {
    let sink = transaction.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    sink.as_mut().send(rows).await?;
    sink.as_mut().finish().await?;
    Ok(())
}

/// The new rows of the tables that get many, encoded for `COPY`, with their statements
/// prepared (together).
pub(super) async fn prepare_copies(
    transaction: &Transaction<'_>,
    changes: &Changes,
    lines: &Lines,
) -> Result<Vec<(Statement, Bytes)>, PgError> {
    let mut copies = Vec::new();
    if changes.payments.len() >= COPY_ROWS_MIN {
        copies.push(copy_payments(&changes.payments, &lines.payments)?);
    }
    if lines.entries.len() >= COPY_ROWS_MIN {
        copies.push(copy_entries(&changes.entries, &lines.entries)?);
    }
    if changes.transfers.len() >= COPY_ROWS_MIN {
        copies.push(copy_transfers(&changes.transfers)?);
    }
    let statements =
        futures_util::future::try_join_all(copies.iter().map(|(sql, _)| transaction.prepare(sql)))
            .await?;
    Ok(statements
        .into_iter()
        .zip(copies.into_iter().map(|(_, rows)| rows.finish()))
        .collect())
}

pub(super) fn copy_payments(
    payments: &[Payment],
    placed: &[(i32, Option<i64>)],
) -> Result<(&'static str, CopyRows), PgError> {
    let mut rows = CopyRows::new(13, payments.len() * 170);
    for (payment, &(position, balance)) in payments.iter().zip(placed) {
        rows.row();
        rows.id(payment.id.to_u128());
        rows.id(payment.payer.to_u128());
        rows.id(payment.merchant.to_u128());
        rows.int8(big("an amount", payment.amount.micros())?);
        rows.text(payment.currency.as_str());
        rows.int8(big("a fee", payment.fee.micros())?);
        rows.optional_text(payment.description.as_deref());
        rows.optional_text(payment.reference.as_deref());
        rows.int8(big("a time", payment.created_at.0)?);
        rows.int8(big("an amount", payment.amount_refunded.micros())?);
        rows.int8(big("a fee", payment.fee_refunded.micros())?);
        rows.int4(position);
        match balance {
            Some(balance) => rows.int8(balance),
            None => rows.null(),
        }
    }
    Ok((
        "COPY payments (id, payer, merchant, amount, currency, fee, description, reference,
                        created_at, amount_refunded, fee_refunded, batch_position,
                        balance_after)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

pub(super) fn copy_entries(
    entries: &[(PayerId, Entry)],
    apart: &[(usize, i32)],
) -> Result<(&'static str, CopyRows), PgError> {
    let mut rows = CopyRows::new(9, apart.len() * 120);
    for ((payer, entry), position) in apart
        .iter()
        .map(|&(index, position)| (&entries[index], position))
    {
        let (kind, id) = entry_object_columns(entry.object);
        rows.row();
        rows.id(payer.to_u128());
        rows.id(id);
        rows.int2(kind);
        rows.text(entry.currency.as_str());
        rows.bool(entry.credit);
        rows.int8(big("an amount", entry.amount.micros())?);
        rows.int8(big("a balance", entry.balance_after.micros())?);
        rows.int8(big("a time", entry.created_at.0)?);
        rows.int4(position);
    }
    Ok((
        "COPY statement_lines (payer, object_id, object_kind, currency, credit, amount,
                               balance_after, created_at, batch_position)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

pub(super) fn copy_transfers(
    records: &[TransferRecord],
) -> Result<(&'static str, CopyRows), PgError> {
    let mut rows = CopyRows::new(12, records.len() * 120);
    for record in records {
        let transfer = &record.transfer;
        let (kind, pending, timeout) = transfer_kind_columns(transfer.kind);
        rows.row();
        rows.id(transfer.id.0);
        rows.int8(transfer.debit.0 as i64);
        rows.int8(transfer.credit.0 as i64);
        rows.numeric(transfer.amount.micros());
        rows.int2(kind);
        match pending {
            Some(id) => rows.id(id),
            None => rows.null(),
        }
        match timeout {
            Some(timeout) => rows.int4(timeout),
            None => rows.null(),
        }
        rows.bool(transfer.linked);
        rows.int2(outcome_column(record.outcome));
        match hold_column(record.hold) {
            Some(hold) => rows.int2(hold),
            None => rows.null(),
        }
        match record.expires_at {
            Some(at) => rows.int8(big("an expiry", at.0)?),
            None => rows.null(),
        }
        rows.int8(big("a time", record.timestamp.0)?);
    }
    Ok((
        "COPY transfers (id, debit_account, credit_account, amount, kind, pending_id,
                         timeout_secs, linked, outcome, hold_state, expires_at, created_at)
         FROM STDIN (FORMAT binary)",
        rows,
    ))
}

/// The operator's key: every touched hash leaves `operator_keys`, then the one that is the
/// operator's now goes in (merchants' and payers' keys go in with their rows).
pub(super) async fn persist_keys(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
) -> Result<(), PgError> {
    if changes.operator_key.is_none() && changes.keys.iter().all(|(_, p)| p.is_some()) {
        return Ok(());
    }
    let touched: Vec<&[u8]> = changes
        .keys
        .iter()
        .map(|(hash, _)| hash.0.as_slice())
        .collect();
    transaction
        .execute_typed(
            "DELETE FROM operator_keys WHERE key_hash = ANY($1)",
            &[(&touched, Type::BYTEA_ARRAY)],
        )
        .await?;
    let operator: Vec<&[u8]> = changes
        .keys
        .iter()
        .filter(|(_, principal)| *principal == Some(Principal::Operator))
        .map(|(hash, _)| hash.0.as_slice())
        .collect();
    if !operator.is_empty() {
        transaction
            .execute_typed(
                "INSERT INTO operator_keys (key_hash, created_at)
                 SELECT key_hash, $2 FROM unnest($1::BYTEA[]) AS u(key_hash)",
                &[
                    (&operator, Type::BYTEA_ARRAY),
                    (&big("a time", now.0)?, Type::INT8),
                ],
            )
            .await?;
    }
    Ok(())
}

pub(super) async fn persist_accounts(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
) -> Result<(), PgError> {
    insert_accounts(transaction, changes, now).await?;
    let now = big("a time", now.0)?;
    if !changes.account_totals.is_empty() {
        let mut ids = Vec::new();
        let mut totals: [Vec<i64>; 4] = Default::default();
        for account in &changes.account_totals {
            ids.push(account.id.0 as i64);
            for (column, value) in totals.iter_mut().zip(account_totals(account)) {
                column.push(big("a total", value)?);
            }
        }
        transaction
            .execute_typed(
                "UPDATE accounts SET debits_posted = u.dp, credits_posted = u.cp,
                                     debits_pending = u.dpe, credits_pending = u.cpe,
                                     changed_at = $6
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                             $5::BIGINT[]) AS u(id, dp, cp, dpe, cpe)
                 WHERE accounts.id = u.id",
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&totals[0], Type::INT8_ARRAY),
                    (&totals[1], Type::INT8_ARRAY),
                    (&totals[2], Type::INT8_ARRAY),
                    (&totals[3], Type::INT8_ARRAY),
                    (&now, Type::INT8),
                ],
            )
            .await?;
    }
    Ok(())
}

/// Takes the accounts of a batch worked out from the forecast, which assumed `before` of them,
/// and returns whether every one held what it assumed. One `UPDATE` takes them all, in id
/// order, and compares each row with the figures assumed as it writes it: PostgreSQL works the
/// new row out from the latest committed version (once the batch holding the row has
/// committed), so the comparison sees what a lock would show, with one row operation per
/// account rather than a lock and then an update. Those the batch changed get their new totals
/// and `now`; those it only read are written back as they were, which locks them as well. On
/// a difference the caller rolls the batch back, so no row keeps what this wrote.
///
/// Rows are taken in id order, as the lock-first path takes them, so that batches of two
/// processes never wait on each other in a cycle. The plan is kept to joins that visit the
/// rows by id: a nested loop from the sorted ids (few accounts in a large table) or a merge
/// join along the primary key (a large share of the table). A hash join or a scan of the heap
/// would visit them in the table's order, which changes as rows are rewritten.
pub(super) async fn take_foreseen_accounts(
    transaction: &Transaction<'_>,
    before: &Accounts,
    changes: &Changes,
    now: Timestamp,
) -> Result<bool, PgError> {
    // Each account as the batch found it, with its new totals if the batch changed it.
    let mut taken: Vec<(Known, Option<&Account>)> =
        before.values().map(|known| (*known, None)).collect();
    let id = |known: &Known| known.account.id.0 as i64;
    taken.sort_unstable_by_key(|(known, _)| id(known));
    for account in &changes.account_totals {
        // Every account a batch changes it first read (or made, and then it is not here).
        let Ok(at) = taken.binary_search_by_key(&(account.id.0 as i64), |(known, _)| id(known))
        else {
            return Ok(false);
        };
        taken[at].1 = Some(account);
    }
    insert_accounts(transaction, changes, now).await?;
    if taken.is_empty() {
        return Ok(true);
    }
    let mut ids = Vec::with_capacity(taken.len());
    let mut totals: [Vec<i64>; 4] = Default::default();
    let mut was: [Vec<i64>; 5] = Default::default();
    let mut times = Vec::with_capacity(taken.len());
    for (known, changed) in &taken {
        ids.push(id(known));
        let after = changed.unwrap_or(&known.account);
        for (column, value) in totals.iter_mut().zip(account_totals(after)) {
            column.push(big("a total", value)?);
        }
        let figures = account_totals(&known.account)
            .into_iter()
            .chain([known.changed_at.0]);
        for (column, value) in was.iter_mut().zip(figures) {
            column.push(big("a figure", value)?);
        }
        let at = if changed.is_some() {
            now
        } else {
            known.changed_at
        };
        times.push(big("a time", at.0)?);
    }
    let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 11] = [
        (&ids, Type::INT8_ARRAY),
        (&totals[0], Type::INT8_ARRAY),
        (&totals[1], Type::INT8_ARRAY),
        (&totals[2], Type::INT8_ARRAY),
        (&totals[3], Type::INT8_ARRAY),
        (&was[0], Type::INT8_ARRAY),
        (&was[1], Type::INT8_ARRAY),
        (&was[2], Type::INT8_ARRAY),
        (&was[3], Type::INT8_ARRAY),
        (&was[4], Type::INT8_ARRAY),
        (&times, Type::INT8_ARRAY),
    ];
    // A row that differs gets a time no batch has (-1) and is not counted. The planner
    // settings last until the transaction ends: this must stay its last statement before the
    // commit.
    let (_, row) = tokio::try_join!(
        transaction.batch_execute(
            "SET LOCAL enable_hashjoin = off; SET LOCAL enable_seqscan = off;
             SET LOCAL enable_bitmapscan = off"
        ),
        transaction.query_typed_one(
            "WITH taken AS (
                 UPDATE accounts SET debits_posted = u.dp, credits_posted = u.cp,
                                     debits_pending = u.dpe, credits_pending = u.cpe,
                                     changed_at = CASE
                                         WHEN (accounts.debits_posted, accounts.credits_posted,
                                               accounts.debits_pending, accounts.credits_pending,
                                               accounts.changed_at)
                                            = (u.was_dp, u.was_cp, u.was_dpe, u.was_cpe,
                                               u.was_at)
                                         THEN u.at ELSE -1 END
                 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[],
                             $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[],
                             $9::BIGINT[], $10::BIGINT[], $11::BIGINT[])
                      AS u(id, dp, cp, dpe, cpe, was_dp, was_cp, was_dpe, was_cpe, was_at, at)
                 WHERE accounts.id = u.id
                 RETURNING accounts.changed_at = u.at AS held)
             SELECT count(*) FILTER (WHERE held) FROM taken",
            &params,
        ),
    )?;
    let held: i64 = row.try_get(0)?;
    Ok(usize::try_from(held).is_ok_and(|held| held == ids.len()))
}

/// Inserts the accounts a batch made.
async fn insert_accounts(
    transaction: &Transaction<'_>,
    changes: &Changes,
    now: Timestamp,
) -> Result<(), PgError> {
    let now = big("a time", now.0)?;
    if !changes.accounts_created.is_empty() {
        let mut ids = Vec::new();
        let mut owner_kinds = Vec::new();
        let mut owner_ids = Vec::new();
        let mut currencies = Vec::new();
        let mut kinds = Vec::new();
        let mut totals: [Vec<i64>; 4] = Default::default();
        for (owner, account) in &changes.accounts_created {
            let (owner_kind, owner_id) = owner_columns(*owner);
            ids.push(account.id.0 as i64);
            owner_kinds.push(owner_kind);
            owner_ids.push(owner_id);
            currencies.push(account.currency.as_str());
            kinds.push(i16::from(account.kind.to_u8()));
            for (column, value) in totals.iter_mut().zip(account_totals(account)) {
                column.push(big("a total", value)?);
            }
        }
        transaction
            .execute_typed(
                "INSERT INTO accounts (id, owner_kind, owner_id, currency, kind, debits_posted,
                                       credits_posted, debits_pending, credits_pending, changed_at)
                 SELECT *, $10::BIGINT FROM unnest($1::BIGINT[], $2::SMALLINT[], $3::UUID[],
                                      $4::TEXT[], $5::SMALLINT[], $6::BIGINT[], $7::BIGINT[],
                                      $8::BIGINT[], $9::BIGINT[])",
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&owner_kinds, Type::INT2_ARRAY),
                    (&owner_ids, Type::UUID_ARRAY),
                    (&currencies, Type::TEXT_ARRAY),
                    (&kinds, Type::INT2_ARRAY),
                    (&totals[0], Type::INT8_ARRAY),
                    (&totals[1], Type::INT8_ARRAY),
                    (&totals[2], Type::INT8_ARRAY),
                    (&totals[3], Type::INT8_ARRAY),
                    (&now, Type::INT8),
                ],
            )
            .await?;
    }
    Ok(())
}

pub(super) fn account_totals(account: &Account) -> [u64; 4] {
    [
        account.debits_posted,
        account.credits_posted,
        account.debits_pending,
        account.credits_pending,
    ]
}

/// A transfer's `kind`, `pending_id` and `timeout_secs` columns.
pub(super) fn transfer_kind_columns(kind: TransferKind) -> (i16, Option<u128>, Option<i32>) {
    match kind {
        TransferKind::Posted => (1, None, None),
        TransferKind::Pending { timeout_secs } => (2, None, Some(timeout_secs as i32)),
        TransferKind::PostPending { pending_id } => (3, Some(pending_id.0), None),
        TransferKind::VoidPending { pending_id } => (4, Some(pending_id.0), None),
    }
}

pub(super) fn hold_column(hold: Option<HoldState>) -> Option<i16> {
    hold.map(|hold| i16::from(farthing_kernel::hold_state_code(hold)))
}

pub(super) fn outcome_column(outcome: Result<(), TransferRejection>) -> i16 {
    match outcome {
        Ok(()) => 0,
        Err(rejection) => transfer_rejection_code(rejection),
    }
}

/// The new hold state of transfer records written before.
pub(super) async fn persist_transfers_resolved(
    transaction: &Transaction<'_>,
    records: &[TransferRecord],
) -> Result<(), PgError> {
    if records.is_empty() {
        return Ok(());
    }
    let ids: Vec<Id> = records.iter().map(|r| id16(r.transfer.id.0)).collect();
    let holds: Vec<Option<i16>> = records.iter().map(|r| hold_column(r.hold)).collect();
    transaction
        .execute_typed(
            "UPDATE transfers SET hold_state = u.hold_state
             FROM unnest($1::UUID[], $2::SMALLINT[]) AS u(id, hold_state)
             WHERE transfers.id = u.id",
            &[(&ids, Type::UUID_ARRAY), (&holds, Type::INT2_ARRAY)],
        )
        .await?;
    Ok(())
}

pub(super) async fn persist_transfers(
    transaction: &Transaction<'_>,
    records: &[TransferRecord],
) -> Result<(), PgError> {
    if records.is_empty() {
        return Ok(());
    }
    if records.len() >= COPY_ROWS_MIN {
        return Ok(());
    }
    let mut ids = Vec::new();
    let mut debits = Vec::new();
    let mut credits = Vec::new();
    let mut amounts = Vec::new();
    let mut kinds = Vec::new();
    let mut pending_ids: Vec<Option<Id>> = Vec::new();
    let mut timeouts: Vec<Option<i32>> = Vec::new();
    let mut linked = Vec::new();
    let mut outcomes = Vec::new();
    let mut holds: Vec<Option<i16>> = Vec::new();
    let mut expires: Vec<Option<i64>> = Vec::new();
    let mut created = Vec::new();
    for record in records {
        let transfer = &record.transfer;
        let (kind, pending, timeout) = transfer_kind_columns(transfer.kind);
        ids.push(id16(transfer.id.0));
        debits.push(transfer.debit.0 as i64);
        credits.push(transfer.credit.0 as i64);
        amounts.push(transfer.amount.micros().to_string());
        kinds.push(kind);
        pending_ids.push(pending.map(id16));
        timeouts.push(timeout);
        linked.push(transfer.linked);
        outcomes.push(outcome_column(record.outcome));
        holds.push(hold_column(record.hold));
        expires.push(
            record
                .expires_at
                .map(|t| big("an expiry", t.0))
                .transpose()?,
        );
        created.push(big("a time", record.timestamp.0)?);
    }
    transaction
        .execute_typed(
            "INSERT INTO transfers (id, debit_account, credit_account, amount, kind, pending_id,
                                    timeout_secs, linked, outcome, hold_state, expires_at,
                                    created_at)
             SELECT id, debit_account, credit_account, amount::NUMERIC, kind, pending_id,
                    timeout_secs, linked, outcome, hold_state, expires_at, created_at
             FROM unnest($1::UUID[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::SMALLINT[],
                         $6::UUID[], $7::INTEGER[], $8::BOOLEAN[], $9::SMALLINT[],
                         $10::SMALLINT[], $11::BIGINT[], $12::BIGINT[])
                  AS u(id, debit_account, credit_account, amount, kind, pending_id,
                       timeout_secs, linked, outcome, hold_state, expires_at, created_at)",
            &[
                (&ids, Type::UUID_ARRAY),
                (&debits, Type::INT8_ARRAY),
                (&credits, Type::INT8_ARRAY),
                (&amounts, Type::TEXT_ARRAY),
                (&kinds, Type::INT2_ARRAY),
                (&pending_ids, Type::UUID_ARRAY),
                (&timeouts, Type::INT4_ARRAY),
                (&linked, Type::BOOL_ARRAY),
                (&outcomes, Type::INT2_ARRAY),
                (&holds, Type::INT2_ARRAY),
                (&expires, Type::INT8_ARRAY),
                (&created, Type::INT8_ARRAY),
            ],
        )
        .await?;
    Ok(())
}
