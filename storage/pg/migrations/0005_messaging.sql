-- Scheduled sends, messages from templates, and recurring messages.
--
-- A scheduled message is an ordinary message row with status 'scheduled' and a
-- send_at; the scheduler claims due rows (FOR UPDATE SKIP LOCKED) and turns them
-- 'queued' in the same transaction. A recurring message makes one ordinary
-- message per occurrence; recurring_occurrence's primary key is what makes each
-- occurrence happen exactly once, however many schedulers run.

ALTER TABLE message ADD COLUMN template_id uuid;
ALTER TABLE message ADD COLUMN recurring_id uuid;
ALTER TABLE message ADD COLUMN canceled_at timestamptz;
-- Only the few rows still waiting for their time are in it (one tiny index per partition).
CREATE INDEX message_scheduled ON message (send_at) WHERE status = 'scheduled';

CREATE TABLE recurring_message (
    church_id    uuid NOT NULL REFERENCES church (id),
    id           uuid NOT NULL,
    name         text NOT NULL,
    body         text,
    template_id  uuid,
    target       jsonb NOT NULL,
    rule         jsonb NOT NULL,
    starts_on    date,
    ends_on      date,
    enabled      boolean NOT NULL DEFAULT true,
    -- The next occurrence in UTC; NULL when paused or past ends_on.
    next_run_at  timestamptz,
    last_run_at  timestamptz,
    created_by   uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id),
    CHECK ((body IS NULL) <> (template_id IS NULL)),
    CHECK (ends_on IS NULL OR starts_on IS NULL OR starts_on <= ends_on)
);
CREATE INDEX recurring_message_list ON recurring_message (church_id, created_at DESC, id DESC);
CREATE INDEX recurring_message_due ON recurring_message (next_run_at)
    WHERE enabled AND next_run_at IS NOT NULL;

CREATE TABLE recurring_occurrence (
    church_id      uuid NOT NULL,
    recurring_id   uuid NOT NULL,
    occurrence_at  timestamptz NOT NULL,
    status         text NOT NULL CHECK (status IN ('sent', 'missed', 'failed')),
    message_id     uuid,
    detail         text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, recurring_id, occurrence_at),
    FOREIGN KEY (church_id, recurring_id) REFERENCES recurring_message (church_id, id)
        ON DELETE CASCADE
);
