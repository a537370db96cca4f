-- chat-gateway schema, version 4: named operators of the admin API and their roles.

-- One row per operator ever added. Removal is a soft delete: the row stays, so the audit trail's
-- operator names keep an answer to "who was that, added by whom, removed when". A name can be
-- added again after removal; the new row gets a new id, which is the operator's generation: a
-- console session remembers it and dies with the row it was signed in with.
CREATE TABLE operators (
    id            bigserial   PRIMARY KEY,
    -- a short slug; `admin` is the built-in operator of GATEWAY_ADMIN_TOKEN, never stored
    name          text        NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,31}$' AND name <> 'admin'),
    role          text        NOT NULL CHECK (role IN ('viewer', 'moderator', 'admin')),
    -- SHA-256 of the token (32 random bytes: no slow hash needed); the token itself is never stored
    token_sha256  bytea       NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text        NOT NULL,
    -- updated at most once a minute, so a busy operator does not write on every call
    last_seen_at  timestamptz,
    removed_at    timestamptz,
    removed_by    text,
    CHECK ((removed_at IS NULL) = (removed_by IS NULL))
);

-- One operator of a name at a time; removed ones keep their rows.
CREATE UNIQUE INDEX operators_name_idx ON operators (name) WHERE removed_at IS NULL;
