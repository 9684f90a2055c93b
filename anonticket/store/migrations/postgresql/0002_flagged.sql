-- See the SQLite migration of the same number: credited transfers a reorg removed are flagged.
ALTER TABLE payments ADD COLUMN flagged_at BIGINT;
