-- chat-gateway schema, version 5: the moderator console's sign-in sessions.

-- One row per console sign-in. The cookie holds 32 random bytes; only their SHA-256 is stored, so
-- a read of this table opens no session. The operator's generation (operators.id, or the built-in
-- admin's) ties the session to the operator it was opened by: removing the operator ends it.
CREATE TABLE console_sessions (
    id_sha256   bytea       PRIMARY KEY CHECK (length(id_sha256) = 32),
    operator    text        NOT NULL,
    generation  bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    -- set at sign-out, or when a request finds the operator removed
    revoked_at  timestamptz
);

-- Sign-in deletes sessions long expired, oldest first.
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
