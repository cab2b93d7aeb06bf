-- Which payments keep their own statement line, and the line each keeps, said once. Statement
-- pages read it through `payments_by_payer` with their own order and limit, bounded below by
-- `payment_lines.made_from` as a parameter (no earlier payment keeps its line, and a known
-- bound lets the planner choose that index; one it must read at run time made it scan all
-- payments by time instead). `statement` joins it to `statement_lines` for export and cursors.
CREATE VIEW payment_own_lines AS
    SELECT payer, id AS object_id, 2::SMALLINT AS object_kind, currency, FALSE AS credit,
           amount, balance_after, created_at, batch_position
    FROM payments
    WHERE balance_after IS NOT NULL;

CREATE OR REPLACE VIEW statement AS
    SELECT payer, object_id, object_kind, currency, credit, amount, balance_after, created_at,
           batch_position
    FROM statement_lines
    UNION ALL
    SELECT payer, object_id, object_kind, currency, credit, amount, balance_after, created_at,
           batch_position
    FROM payment_own_lines;
