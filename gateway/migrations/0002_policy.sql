-- chat-gateway schema, version 2: the enforcement policy (points, strike lifetimes, warnings,
-- zero tolerance) and what reversals, operators and tenants need on the audit trail.

-- Every event kind of this round at once, so later work needs no constraint change.
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check CHECK (kind IN (
    'violation', 'warning', 'output_violation', 'block', 'unblock', 'reversed',
    'appeal_accepted', 'appeal_rejected', 'note', 'erased'));

ALTER TABLE events
    -- violation / output_violation: the points it adds (its heaviest category's weight); 0 for a
    -- warning, a shadow violation and one recorded while the user was blocked.
    -- block: the points that counted when it began.
    ADD COLUMN points         integer     NOT NULL DEFAULT 0 CHECK (points >= 0),
    -- counted violations and warnings: when the strike stops counting, on the database clock at
    -- insert ('infinity': until a block or unblock). NULL: a row from before version 2, whose
    -- lifetime is the policy's window.
    ADD COLUMN expires_at     timestamptz,
    -- a reversed event (a moderator's correction or an accepted appeal) counts for nothing.
    ADD COLUMN reversed_at    timestamptz,
    ADD COLUMN reversed_by    text,
    ADD COLUMN reverse_reason text,
    -- the operator who acted (admin events); NULL for the policy and expiry.
    ADD COLUMN operator       text,
    -- the application that made the call (tenants), when known.
    ADD COLUMN app            text,
    -- policy block: the violations that caused it (those whose points counted, or the one
    -- zero-tolerance violation), so that undoing one can undo the block.
    ADD COLUMN causes         bigint[];

-- Rows from before version 2: a counted violation was one strike; admin events were the admin's.
UPDATE events SET points = 1 WHERE kind = 'violation' AND counted;
UPDATE events SET operator = 'admin' WHERE actor = 'admin';

-- The event of the block in force: the 403's statement of reasons and the block cache read it.
ALTER TABLE users ADD COLUMN block_event_id bigint REFERENCES events (id) ON DELETE SET NULL;
UPDATE users u SET block_event_id = (
    SELECT e.id FROM events e
    WHERE e.user_id = u.user_id AND e.kind = 'block'
    ORDER BY e.at DESC, e.id DESC LIMIT 1)
WHERE u.blocked_until IS NOT NULL;

-- The points that count: one SUM over the user's counted, unreversed violations after
-- strikes_since, answered from the index alone.
DROP INDEX events_strikes_idx;
CREATE INDEX events_points_idx ON events (user_id, at) INCLUDE (points, expires_at)
    WHERE counted AND reversed_at IS NULL;
