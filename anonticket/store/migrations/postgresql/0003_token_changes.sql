-- Each top-up or revoke stamps its token with the next change number, so every node can evict
-- exactly the tokens that changed from its in-memory answers (anonticket.store.answercache).
-- 0 = never changed since issued.  Numbers come from a sequence: taken at update, visible at
-- commit, so a reader re-reads a short overlap below the highest number it has seen.
CREATE SEQUENCE token_changes;
ALTER TABLE tokens ADD COLUMN changed_seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tokens_by_change ON tokens (changed_seq);
