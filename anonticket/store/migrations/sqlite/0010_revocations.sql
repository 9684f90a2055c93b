-- Revocations an operator undid (POST /api/v1/token/{token}/unrevoke, anonticket-admin
-- unrevoke; docs/admin.md).  A token row holds only its current revocation (revoked_at,
-- revoke_reason); un-revoking moves that one here, with when and why it was undone, so a
-- token's whole history is these rows and, while it is revoked, its own columns.
CREATE TABLE revocations (
    id              INTEGER PRIMARY KEY,
    token_id        INTEGER NOT NULL REFERENCES tokens (id),
    revoked_at      INTEGER NOT NULL,
    revoke_reason   TEXT,
    unrevoked_at    INTEGER NOT NULL,
    unrevoke_reason TEXT    NOT NULL
);
CREATE INDEX revocations_by_token ON revocations (token_id, id);
