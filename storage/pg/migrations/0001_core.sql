-- Koinonia core schema.
-- Every tenant table carries church_id, and every primary and foreign key
-- starts with it, so Citus can distribute all of them by church_id later.
-- message, message_recipient and conversation_message are RANGE-partitioned by
-- month on created_at; their ids are UUIDv7, whose embedded millisecond equals
-- created_at, so a lookup by id always names its partition.

CREATE TABLE church (
    id            uuid PRIMARY KEY,
    name          text NOT NULL,
    plan          text NOT NULL DEFAULT 'starter' CHECK (plan IN ('starter', 'growth', 'pro')),
    phone_number  text NOT NULL UNIQUE,
    country       text NOT NULL DEFAULT 'US',
    timezone      text NOT NULL DEFAULT 'America/New_York',
    status        text NOT NULL DEFAULT 'active',
    help_text     text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Login finds a user by email before it knows the church; in a Citus cluster
-- this small table would be a reference table.
CREATE TABLE staff_user (
    church_id      uuid NOT NULL REFERENCES church (id),
    id             uuid NOT NULL,
    email          text NOT NULL,
    password_hash  text NOT NULL,
    role           text NOT NULL DEFAULT 'owner' CHECK (role IN ('owner', 'admin', 'staff')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE UNIQUE INDEX staff_user_email ON staff_user (lower(email));

CREATE TABLE api_key (
    church_id     uuid NOT NULL REFERENCES church (id),
    id            uuid NOT NULL,
    name          text NOT NULL,
    prefix        text NOT NULL,
    secret_hash   bytea NOT NULL,
    scopes        text[] NOT NULL,
    created_by    uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    PRIMARY KEY (church_id, id)
);
CREATE UNIQUE INDEX api_key_prefix ON api_key (prefix);

CREATE TABLE branch (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);

CREATE TABLE member_group (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    name        text NOT NULL,
    branch_id   uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id),
    FOREIGN KEY (church_id, branch_id) REFERENCES branch (church_id, id)
);

CREATE TABLE member (
    church_id        uuid NOT NULL REFERENCES church (id),
    id               uuid NOT NULL,
    first_name       text NOT NULL,
    last_name        text NOT NULL DEFAULT '',
    email            text,
    phone_cipher     bytea NOT NULL,
    phone_hash       bytea NOT NULL,
    branch_id        uuid,
    timezone         text,
    opted_in         boolean NOT NULL DEFAULT true,
    opt_source       text NOT NULL DEFAULT 'staff',
    opt_changed_at   timestamptz NOT NULL DEFAULT now(),
    verified         boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    PRIMARY KEY (church_id, id),
    FOREIGN KEY (church_id, branch_id) REFERENCES branch (church_id, id)
);
CREATE UNIQUE INDEX member_phone ON member (church_id, phone_hash) WHERE deleted_at IS NULL;

CREATE TABLE group_membership (
    church_id   uuid NOT NULL,
    group_id    uuid NOT NULL,
    member_id   uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, group_id, member_id),
    FOREIGN KEY (church_id, group_id) REFERENCES member_group (church_id, id) ON DELETE CASCADE,
    FOREIGN KEY (church_id, member_id) REFERENCES member (church_id, id) ON DELETE CASCADE
);
CREATE INDEX group_membership_member ON group_membership (church_id, member_id);

CREATE TABLE message (
    church_id        uuid NOT NULL,
    id               uuid NOT NULL,
    created_at       timestamptz NOT NULL,
    body             text NOT NULL,
    target           jsonb NOT NULL,
    status           text NOT NULL,
    recipient_count  integer NOT NULL DEFAULT 0,
    segments         integer NOT NULL,
    encoding         text NOT NULL,
    from_number      text NOT NULL,
    send_at          timestamptz,
    created_by       uuid,
    materialized_at  timestamptz,
    completed_at     timestamptz,
    PRIMARY KEY (church_id, id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX message_list ON message (church_id, created_at DESC, id DESC);
CREATE INDEX message_pending ON message (created_at) WHERE materialized_at IS NULL;
CREATE INDEX message_active ON message (created_at) WHERE status = 'sending';

-- No foreign key from recipients to message: a broadcast materializes tens of
-- thousands of rows at once and a per-row RI check would halve that rate; the
-- rows are only ever written by the materializer, inside the message's church.
CREATE TABLE message_recipient (
    church_id            uuid NOT NULL,
    message_id           uuid NOT NULL,
    id                   uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at           timestamptz NOT NULL,
    member_id            uuid NOT NULL,
    status               text NOT NULL DEFAULT 'queued',
    provider_message_id  text,
    error_code           text,
    attempts             smallint NOT NULL DEFAULT 0,
    segments             smallint NOT NULL DEFAULT 1,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, message_id, id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX message_recipient_provider ON message_recipient (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
-- No index on status or updated_at: every status change would then be a
-- non-HOT update touching it. The reconciler finds open recipients through the
-- broadcasts still sending (message_active) and their primary-key prefix.

CREATE TABLE conversation (
    church_id        uuid NOT NULL,
    id               uuid NOT NULL,
    member_id        uuid NOT NULL,
    status           text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    unread_count     integer NOT NULL DEFAULT 0,
    assignee_id      uuid,
    last_message_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id),
    UNIQUE (church_id, member_id),
    FOREIGN KEY (church_id, member_id) REFERENCES member (church_id, id)
);
CREATE INDEX conversation_recent ON conversation (church_id, last_message_at DESC, id DESC);

CREATE TABLE conversation_message (
    church_id            uuid NOT NULL,
    id                   uuid NOT NULL,
    created_at           timestamptz NOT NULL,
    conversation_id      uuid NOT NULL,
    direction            text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    body                 text NOT NULL,
    media                jsonb NOT NULL DEFAULT '[]',
    status               text NOT NULL,
    provider_message_id  text,
    sent_by              uuid,
    PRIMARY KEY (church_id, id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX conversation_message_thread
    ON conversation_message (church_id, conversation_id, created_at DESC, id DESC);

CREATE TABLE webhook_endpoint (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    url         text NOT NULL,
    secret      text NOT NULL,
    events      text[] NOT NULL,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);

-- Inbound provider events processed once (dedupe by the provider's event id).
CREATE TABLE provider_event (
    event_id     text PRIMARY KEY,
    event_type   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX provider_event_received ON provider_event (received_at);

-- Development sending numbers are allocated from a pool the simulator accepts.
CREATE SEQUENCE sending_number_seq START 1000000;
