-- Per-church and per-key request limits that override the plan's, and the audit
-- log of staff and API-key actions.
ALTER TABLE church ADD COLUMN rate_limit_per_min integer CHECK (rate_limit_per_min > 0);
ALTER TABLE api_key ADD COLUMN rate_limit_per_min integer CHECK (rate_limit_per_min > 0);

CREATE TABLE audit_log (
    church_id    uuid NOT NULL REFERENCES church (id),
    id           uuid NOT NULL,
    actor_type   text NOT NULL CHECK (actor_type IN ('user', 'api_key', 'system')),
    actor_id     uuid,
    action       text NOT NULL,
    target_type  text NOT NULL DEFAULT '',
    target_id    text,
    details      jsonb NOT NULL DEFAULT '{}',
    request_id   text,
    ip           text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE INDEX audit_log_action ON audit_log (church_id, action, id);
