-- A payment's statement line lives in the payment's own row: `balance_after` is the payer's
-- balance after it, and the line is read from the payment's columns through the index the
-- payer's payments are listed by. That is one row and one index entry fewer per payment than a
-- row in `statement_lines`. Lines of top-ups, refunds and captured holds stay in
-- `statement_lines`, as do the lines of payments made before this migration and of any
-- payment whose line is not simply its own debit (NULL `balance_after`).
ALTER TABLE payments ADD COLUMN balance_after BIGINT CHECK (balance_after >= 0);

-- Lines are kept in payment rows only for payments made at or after `made_from`: every row
-- made before the migration is earlier, so reading a payer's statement never scans old
-- payments for lines they do not hold. A writer whose batch is earlier (a clock behind) puts
-- the lines in `statement_lines`. One row, never changed.
CREATE TABLE payment_lines (
    made_from BIGINT NOT NULL,
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton)
);
INSERT INTO payment_lines (made_from)
SELECT COALESCE(GREATEST((SELECT max(created_at) FROM payments),
                         (SELECT max(created_at) FROM statement_lines)) + 1, 0);

-- A payer's statement: the lines in `statement_lines` and those kept in payment rows, in the
-- one order `(created_at, batch_position, object_id)`. Within one batch, positions of a
-- payer's lines in both places follow the order they were made in (see the store's `Lines`).
-- object_kind 2 is a payment.
CREATE VIEW statement AS
    SELECT payer, object_id, object_kind, currency, credit, amount, balance_after, created_at,
           batch_position
    FROM statement_lines
    UNION ALL
    SELECT payer, id, 2::SMALLINT, currency, FALSE, amount, balance_after, created_at,
           batch_position
    FROM payments
    WHERE balance_after IS NOT NULL
      AND created_at >= (SELECT made_from FROM payment_lines);
