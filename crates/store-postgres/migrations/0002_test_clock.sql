-- How far a test clock (`farthing serve --test-clock`) has been moved ahead of the wall
-- clock, shared by every server on the database so that its time never goes back. One row at
-- most; servers without a test clock never read it.
CREATE TABLE test_clock (
    id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
    offset_micros BIGINT NOT NULL CHECK (offset_micros >= 0)
);
