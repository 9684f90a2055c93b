-- Each top-up or revoke stamps its token with the next change number, so every node can evict
-- exactly the tokens that changed from its in-memory answers (anonticket.store.answercache).
-- 0 = never changed since issued.  SQLite serialises writers, so max + 1 is unique and ordered.
ALTER TABLE tokens ADD COLUMN changed_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tokens_by_change ON tokens (changed_seq);
