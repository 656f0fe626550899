-- Citus-ready (deploy/citus.sql; proven by tests/storage/pg/test_citus_schema.py).
--
-- Citus can only enforce a unique constraint inside one shard, so every unique key
-- of a table distributed by church must start with church_id. The three global
-- uniques (a church's sending number, a staff e-mail, an API-key prefix) answer
-- questions asked before the church is known (which church is this inbound text
-- for? whose login? whose key?): each becomes a small lookup table, a reference
-- table in Citus (copied to every node), written in the transaction that writes
-- its owner row. Its primary key is what refuses a duplicate now.
--
-- Every existing row is copied into its lookup here, before the global index goes,
-- so nothing is findable less, or duplicable more, across the upgrade.

CREATE TABLE church_number_lookup (
    phone_number  text PRIMARY KEY,
    church_id     uuid NOT NULL
);
INSERT INTO church_number_lookup (phone_number, church_id) SELECT phone_number, id FROM church;
ALTER TABLE church DROP CONSTRAINT church_phone_number_key;

-- Keyed by the lower-cased address: the old index was on lower(email).
CREATE TABLE staff_email_lookup (
    email      text PRIMARY KEY CHECK (email = lower(email)),
    church_id  uuid NOT NULL,
    user_id    uuid NOT NULL,
    UNIQUE (church_id, user_id)
);
INSERT INTO staff_email_lookup (email, church_id, user_id)
SELECT lower(email), church_id, id FROM staff_user;
DROP INDEX staff_user_email;

-- Only live keys: revoking a key deletes its row, so the table stays as small as the
-- number of keys in use, and a revoked key is not found at all.
CREATE TABLE api_key_lookup (
    prefix      text PRIMARY KEY,
    church_id   uuid NOT NULL,
    api_key_id  uuid NOT NULL,
    UNIQUE (church_id, api_key_id)
);
INSERT INTO api_key_lookup (prefix, church_id, api_key_id)
SELECT prefix, church_id, id FROM api_key WHERE revoked_at IS NULL;
DROP INDEX api_key_prefix;

-- Provider-event dedupe is written for every receipt (two per text): a hot path that
-- must not be a reference table (every write would go to every node). It is keyed by
-- church, known by then (the receipt's reference, or the number an inbound text was
-- sent to). Rows recorded before this migration carry no church: they get the nil
-- uuid, the key of events no church is found for, and are pruned as usual.
ALTER TABLE provider_event
    ADD COLUMN church_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
ALTER TABLE provider_event ALTER COLUMN church_id DROP DEFAULT;
ALTER TABLE provider_event DROP CONSTRAINT provider_event_pkey;
ALTER TABLE provider_event ADD PRIMARY KEY (church_id, event_id);

-- The event log is written by every transaction that changes anything: distributed
-- by church too, so a change and its events stay on one node. The church in a row's
-- items is what the relay uses; the column only places the row. Rows waiting now
-- (milliseconds of work) take the nil uuid.
ALTER TABLE event_log
    ADD COLUMN church_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000';
ALTER TABLE event_log ALTER COLUMN church_id DROP DEFAULT;
ALTER TABLE event_log DROP CONSTRAINT event_log_pkey;
ALTER TABLE event_log ADD PRIMARY KEY (church_id, seq);
-- The relay drains in seq order across churches.
CREATE INDEX event_log_seq ON event_log (seq);
