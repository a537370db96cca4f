-- chat-gateway schema, version 3: appeals, reversals, notes and erasure.

-- A user's appeal of one of their violations or blocks: one per event. An appeal goes with its
-- event (retention and erasure delete the event; an open appeal keeps it from retention).
CREATE TABLE appeals (
    id               bigserial   PRIMARY KEY,
    event_id         bigint      NOT NULL UNIQUE REFERENCES events (id) ON DELETE CASCADE,
    user_id          text        NOT NULL REFERENCES users (user_id),
    status           text        NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'accepted', 'rejected')),
    -- the user's own words, at most 2000 characters
    message          text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    decided_at       timestamptz,
    decided_by       text,
    decision_reason  text,
    CHECK ((status = 'open') = (decided_at IS NULL))
);

-- The moderators' queue and its keyset pages, oldest first; a user's appeals for the standing.
CREATE INDEX appeals_queue_idx ON appeals (status, id);
CREATE INDEX appeals_user_idx ON appeals (user_id, id);

ALTER TABLE events
    -- reversed / appeal_accepted / appeal_rejected: the event the decision is about.
    ADD COLUMN event_ref   bigint,
    -- appeal_accepted / appeal_rejected: the appeal decided.
    ADD COLUMN appeal_id   bigint,
    -- reversed / appeal_accepted: every event the decision reversed (the one named, and a
    -- policy block that no longer stands without it).
    ADD COLUMN affected    bigint[],
    -- note: the moderator's words.
    ADD COLUMN note        text,
    -- erased: the hex SHA-256 of the erased user's id, the only trace of it left.
    ADD COLUMN user_sha256 text;

-- Notes written before this version kept their words in `reason`.
UPDATE events SET note = reason, reason = NULL WHERE kind = 'note';

-- An `erased` event belongs to no user any more: it holds only the hash of the id.
ALTER TABLE events ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE events ADD CONSTRAINT events_user_check CHECK ((user_id IS NULL) = (kind = 'erased'));

-- Erasure deletes a user's outbox rows by event; retention checks an event for undelivered rows.
CREATE INDEX webhook_outbox_event_idx ON webhook_outbox (event_id);
