-- Passes used at verification (SPEC §14, docs/passes.md): a pass verifies once.  nonce_tag is a
-- keyed tag (secret.key) of the pass's nonce and key id: nothing here can be matched to an
-- issuance (which stores nothing per pass at all).  period: the issuer key's, so that rows of
-- keys past their grace period (no pass of theirs verifies any more) can be deleted.
CREATE TABLE used_passes (
    nonce_tag BLOB    PRIMARY KEY,
    period    INTEGER NOT NULL,
    used_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX used_passes_by_period ON used_passes (period);
