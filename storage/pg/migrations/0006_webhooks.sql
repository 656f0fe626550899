-- Outgoing webhooks: endpoint management, the event outbox, one delivery row per
-- (endpoint, event), and the attempt log.

ALTER TABLE webhook_endpoint
    ADD COLUMN description          text NOT NULL DEFAULT '',
    ADD COLUMN updated_at           timestamptz NOT NULL DEFAULT now(),
    -- A rotated-out secret keeps signing (second signature) until it expires.
    ADD COLUMN previous_secret      text,
    ADD COLUMN previous_expires_at  timestamptz,
    ADD COLUMN disabled_reason      text,
    ADD COLUMN disabled_at          timestamptz,
    -- Failure bookkeeping: since when no attempt succeeded, and how many deliveries
    -- in a row used up every retry.
    ADD COLUMN failing_since        timestamptz,
    ADD COLUMN failed_deliveries    integer NOT NULL DEFAULT 0;

-- Bumped after every change to which endpoints are enabled for which events, so
-- each process can keep a cheap cache of "does this church want this event".
CREATE SEQUENCE webhook_endpoint_version;

-- An event recorded for webhooks, in the transaction of the change it describes;
-- only when at least one enabled endpoint of the church subscribes to it.
CREATE TABLE webhook_event (
    church_id    uuid NOT NULL REFERENCES church (id),
    id           uuid NOT NULL,
    type         text NOT NULL,
    data         jsonb NOT NULL,
    occurred_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE INDEX webhook_event_occurred ON webhook_event (occurred_at);

-- One row per endpoint and event. pending: due at next_attempt_at (a claimed row's
-- next_attempt_at is its lease); paused: the endpoint is disabled; succeeded and
-- failed are final (until a manual replay).
CREATE TABLE webhook_delivery (
    church_id        uuid NOT NULL,
    endpoint_id      uuid NOT NULL,
    event_id         uuid NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'paused', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    manual           boolean NOT NULL DEFAULT false,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, event_id, endpoint_id),
    FOREIGN KEY (church_id, endpoint_id) REFERENCES webhook_endpoint (church_id, id)
        ON DELETE CASCADE,
    FOREIGN KEY (church_id, event_id) REFERENCES webhook_event (church_id, id)
        ON DELETE CASCADE
);
CREATE INDEX webhook_delivery_due ON webhook_delivery (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_delivery_endpoint ON webhook_delivery (church_id, endpoint_id, status);

-- Every attempt, newest first per endpoint for the attempt log.
CREATE TABLE webhook_attempt (
    church_id         uuid NOT NULL,
    id                uuid NOT NULL,
    endpoint_id       uuid NOT NULL,
    event_id          uuid NOT NULL,
    event_type        text NOT NULL,
    attempt           integer NOT NULL,
    trigger           text NOT NULL CHECK (trigger IN ('scheduled', 'manual')),
    status_code       integer,
    latency_ms        integer NOT NULL,
    response_excerpt  text,
    error             text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id),
    FOREIGN KEY (church_id, endpoint_id) REFERENCES webhook_endpoint (church_id, id)
        ON DELETE CASCADE
);
CREATE INDEX webhook_attempt_log ON webhook_attempt (church_id, endpoint_id, id);
CREATE INDEX webhook_attempt_created ON webhook_attempt (created_at);
