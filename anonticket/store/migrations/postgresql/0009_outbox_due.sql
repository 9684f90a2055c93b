-- See the SQLite migration of the same number: due events walked in order, never sorted.
DROP INDEX outbox_waiting;
CREATE INDEX outbox_due ON outbox (state, next_attempt_at, id);
