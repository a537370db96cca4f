-- chat-gateway schema, version 1.
-- The database clock (now()) is the clock for every block, strike and event.

CREATE TABLE users (
    user_id        text        PRIMARY KEY,
    -- Strikes count from this moment on (a block's expiry or an unblock moves it).
    strikes_since  timestamptz NOT NULL DEFAULT '-infinity',
    -- NULL: not blocked. 'infinity': permanent. A past value is an expired block (no block).
    blocked_until  timestamptz,
    -- Who set the block in force: 'policy' or 'admin'.
    blocked_by     text        CHECK (blocked_by IN ('policy', 'admin')),
    -- Policy blocks so far; drives escalation and GATEWAY_PERMANENT_AFTER_BLOCKS.
    blocks         integer     NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- The expiry sweeper and the blocked-users listing and count.
CREATE INDEX users_blocked_until_idx ON users (blocked_until) WHERE blocked_until IS NOT NULL;

-- Append-only audit trail. No prompt text: categories, detector, rule, a SHA-256 of the text.
CREATE TABLE events (
    id             bigserial   PRIMARY KEY,
    user_id        text        NOT NULL REFERENCES users (user_id),
    at             timestamptz NOT NULL DEFAULT now(),
    kind           text        NOT NULL CHECK (kind IN ('violation', 'block', 'unblock')),
    -- violation: true in shadow mode (recorded, no strike)
    shadow         boolean     NOT NULL DEFAULT false,
    -- violation: false when it added no strike (shadow, or the user was already blocked)
    counted        boolean     NOT NULL DEFAULT false,
    categories     text[]      NOT NULL DEFAULT '{}',
    detector       text,
    rule           text,
    path           text,
    text_sha256    text,
    scores         jsonb,
    -- block / unblock
    actor          text        CHECK (actor IN ('admin', 'policy', 'expiry')),
    reason         text,
    block_number   integer,
    blocked_until  timestamptz
);

-- A user's events, newest first.
CREATE INDEX events_user_idx ON events (user_id, at DESC, id DESC);
-- The 24-hour statistics.
CREATE INDEX events_at_idx ON events (at);
-- Strike counting: the user's counted violations after strikes_since.
CREATE INDEX events_strikes_idx ON events (user_id, at) WHERE counted;

-- Transactional outbox for webhooks: written in the transaction of the state change.
CREATE TABLE webhook_outbox (
    id               bigserial   PRIMARY KEY,
    event_id         bigint      NOT NULL REFERENCES events (id),
    payload          jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_error       text
);

CREATE INDEX webhook_outbox_due_idx ON webhook_outbox (next_attempt_at) WHERE delivered_at IS NULL;
