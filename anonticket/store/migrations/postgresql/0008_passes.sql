-- See the SQLite migration of the same number: passes used at verification.
CREATE TABLE used_passes (
    nonce_tag BYTEA  PRIMARY KEY,
    period    BIGINT NOT NULL,
    used_at   BIGINT NOT NULL
);
CREATE INDEX used_passes_by_period ON used_passes (period);
