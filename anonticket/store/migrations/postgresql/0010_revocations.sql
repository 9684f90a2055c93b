-- See the SQLite migration of the same number: revocations an operator undid.
CREATE TABLE revocations (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_id        BIGINT NOT NULL REFERENCES tokens (id),
    revoked_at      BIGINT NOT NULL,
    revoke_reason   TEXT,
    unrevoked_at    BIGINT NOT NULL,
    unrevoke_reason TEXT   NOT NULL
);
CREATE INDEX revocations_by_token ON revocations (token_id, id);
