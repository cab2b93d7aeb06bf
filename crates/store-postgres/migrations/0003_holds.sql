-- Holds: payments authorized now and captured, canceled or expired later. One row per held
-- payment, changed in place as it settles. status: 1 held, 2 captured, 3 canceled,
-- 4 expired. The three transfer ids are chosen when the hold is placed: its pending transfer,
-- the transfer that posts or voids it, and the fee leg of a capture.
CREATE TABLE holds (
    payment UUID PRIMARY KEY,
    status SMALLINT NOT NULL CHECK (status BETWEEN 1 AND 4),
    amount_authorized BIGINT NOT NULL CHECK (amount_authorized > 0),
    amount_captured BIGINT NOT NULL CHECK (amount_captured BETWEEN 0 AND amount_authorized),
    fee_captured BIGINT NOT NULL CHECK (fee_captured BETWEEN 0 AND amount_captured),
    expires_at BIGINT NOT NULL,
    resolved_at BIGINT,
    hold_transfer UUID NOT NULL,
    settle_transfer UUID NOT NULL,
    fee_transfer UUID NOT NULL
);
-- Live holds by deadline: what an expiry reads, oldest first. Small: only live holds.
CREATE INDEX holds_live ON holds (expires_at, payment) WHERE status = 1;

-- A payer's payments, listed in the order made like a merchant's. A held payment has no
-- statement line until it is captured, so the lines cannot list a payer's payments.
CREATE INDEX payments_by_payer ON payments (payer, created_at, batch_position, id);
