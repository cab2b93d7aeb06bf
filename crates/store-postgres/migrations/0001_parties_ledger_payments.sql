-- Farthing's first schema: parties, the ledger, payments and what hangs off them.
-- Portable to PostgreSQL-compatible distributed engines: no sequences (ids are chosen by the
-- application), no triggers, no stored procedures; amounts are BIGINT micro-units.
-- Object ids (merchants, payers, payments, top-ups, refunds, transfers) are their 128-bit
-- values as UUIDs: 16 bytes, big-endian, fixed width (cheap to compare in indexes). Times are
-- microseconds since the Unix epoch. Two u64 fields that the application does not bound below
-- i64::MAX (a merchant's fixed fee, and the amount of a transfer the ledger refused) are
-- NUMERIC(20, 0).

-- At most one row: `singleton` is unique, so two writers setting a key at once conflict.
CREATE TABLE operator_keys (
    key_hash BYTEA PRIMARY KEY,
    created_at BIGINT NOT NULL,
    singleton BOOLEAN NOT NULL DEFAULT TRUE UNIQUE CHECK (singleton)
);

CREATE TABLE merchants (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    fee_bps INTEGER NOT NULL CHECK (fee_bps BETWEEN 0 AND 10000),
    fee_fixed NUMERIC(20, 0) NOT NULL CHECK (fee_fixed BETWEEN 0 AND 18446744073709551615),
    created_at BIGINT NOT NULL
);

CREATE TABLE payers (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash BYTEA NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);

-- Account ids are derived from (owner, currency) by the application; totals are kept, balances
-- derived. owner_kind: 1 payer, 2 merchant, 3 platform fees, 4 external funding (owner_id the
-- nil UUID for the last two). Pages are kept half empty so that a batch's new totals fit
-- beside the old ones (a heap-only update: no index entry per update).
CREATE TABLE accounts (
    id BIGINT PRIMARY KEY,
    owner_kind SMALLINT NOT NULL,
    owner_id UUID NOT NULL,
    currency CHAR(3) NOT NULL,
    kind SMALLINT NOT NULL,
    debits_posted BIGINT NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted BIGINT NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending BIGINT NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending BIGINT NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    -- The time of the last batch that changed the account. A batch that locks the account is
    -- given a later time, so lists ordered by time follow the order batches committed in.
    changed_at BIGINT NOT NULL DEFAULT 0,
    UNIQUE (owner_kind, owner_id, currency)
) WITH (fillfactor = 50);

-- Every transfer id ever seen, applied or failed: a retried id answers with its first outcome.
-- kind: 1 posted, 2 pending (timeout_secs), 3 post pending, 4 void pending (pending_id).
-- outcome: 0 applied, else the ledger's rejection (see `transfer_rejection_code`).
-- hold_state: 1 pending, 2 posted, 3 voided, 4 expired. timeout_secs is the u32 bit-cast.
CREATE TABLE transfers (
    id UUID PRIMARY KEY,
    debit_account BIGINT NOT NULL,
    credit_account BIGINT NOT NULL,
    amount NUMERIC(20, 0) NOT NULL,
    kind SMALLINT NOT NULL,
    pending_id UUID,
    timeout_secs INTEGER,
    linked BOOLEAN NOT NULL,
    outcome SMALLINT NOT NULL,
    hold_state SMALLINT,
    expires_at BIGINT,
    created_at BIGINT NOT NULL
);

CREATE TABLE topups (
    id UUID PRIMARY KEY,
    payer UUID NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency CHAR(3) NOT NULL,
    source SMALLINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE payments (
    id UUID PRIMARY KEY,
    payer UUID NOT NULL,
    merchant UUID NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency CHAR(3) NOT NULL,
    fee BIGINT NOT NULL CHECK (fee >= 0 AND fee <= amount),
    description TEXT,
    reference TEXT,
    created_at BIGINT NOT NULL,
    -- Its place among the payments its batch made (the batch's order, from 0).
    batch_position INTEGER NOT NULL CHECK (batch_position >= 0),
    amount_refunded BIGINT NOT NULL DEFAULT 0 CHECK (amount_refunded BETWEEN 0 AND amount),
    fee_refunded BIGINT NOT NULL DEFAULT 0 CHECK (fee_refunded BETWEEN 0 AND fee)
);
-- Lists are newest first by (created_at, batch_position, id), with no global sequence across
-- servers: the records of one batch share one time, and the position keeps the order they were
-- made in; rows of two batches with the same time and position fall back to id order. The
-- indexes ascend, so that new rows land at the right-hand end, where B-tree inserts are cheapest
-- and pages split to stay full; lists read them backwards.
CREATE INDEX payments_newest ON payments (created_at, batch_position, id);
-- A payer's payments are listed through its statement lines, which hold them in order.
CREATE INDEX payments_by_merchant
    ON payments (merchant, created_at, batch_position, id);

CREATE TABLE refunds (
    id UUID PRIMARY KEY,
    payment UUID NOT NULL,
    payer UUID NOT NULL,
    merchant UUID NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency CHAR(3) NOT NULL,
    fee_refunded BIGINT NOT NULL CHECK (fee_refunded >= 0),
    created_at BIGINT NOT NULL
);
CREATE INDEX refunds_by_payment ON refunds (payment);

-- A payer's statement: one line per top-up, payment and refund, with the running balance,
-- newest first by (created_at, batch_position, object_id) like payments. batch_position is
-- the line's place among the lines its batch made (that order is the order made within each
-- payer). object_kind: 1 top-up, 2 payment, 3 refund. A line has its object's created_at, so
-- the one index, in statement order, also finds an object's line.
-- topups.source: 1 sandbox, 2 sandbox decline.
CREATE TABLE statement_lines (
    payer UUID NOT NULL,
    object_id UUID NOT NULL,
    object_kind SMALLINT NOT NULL,
    currency CHAR(3) NOT NULL,
    credit BOOLEAN NOT NULL,
    amount BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    batch_position INTEGER NOT NULL CHECK (batch_position >= 0),
    PRIMARY KEY (payer, created_at, batch_position, object_id)
);

-- Idempotency keys, scoped to the calling principal. principal_kind: 1 operator, 2 merchant,
-- 3 payer (principal_id the nil UUID for the operator). The outcome is the first answer, encoded.
CREATE TABLE idempotency_keys (
    principal_kind SMALLINT NOT NULL,
    principal_id UUID NOT NULL,
    key TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    outcome BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (principal_kind, principal_id, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
