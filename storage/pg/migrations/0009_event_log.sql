-- The event log (storage/event_log.py): events committed with the change they
-- describe, one row per producing transaction, until the relay has recorded their
-- webhook copies (hooked) and published them to Redis (then the row is deleted).
-- A queue, not a history: it holds only what has not left yet.
CREATE TABLE event_log (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    items       bytea NOT NULL,
    hooked      boolean NOT NULL DEFAULT false,
    -- Set aside by a relay that could not decode it (another version wrote it).
    unreadable  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- Rows are inserted and deleted within milliseconds: vacuum it often.
ALTER TABLE event_log SET (autovacuum_vacuum_scale_factor = 0.0,
                           autovacuum_vacuum_threshold = 1000);

-- The per-process webhook interest cache is gone (the relay matches endpoints in
-- SQL every time, so an endpoint made a moment ago misses nothing): so is its clock.
DROP SEQUENCE IF EXISTS webhook_endpoint_version;
