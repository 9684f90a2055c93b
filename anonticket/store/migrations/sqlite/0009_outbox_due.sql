-- The webhook delivery takes due events in the order they are due (then written), walking this
-- index and stopping after a few: its cost no longer grows with the backlog (0007's index made
-- it read and sort every waiting event: 95 ms at 100,000, on the connection redeems use).
DROP INDEX outbox_waiting;
CREATE INDEX outbox_due ON outbox (state, next_attempt_at, id);
