-- Koinonia on Citus: run once on the coordinator, on the migrated schema (koinonia
-- migrate), before the application writes. Sharding is by church: every tenant
-- table is distributed by church_id and colocated with `church` (distributed by its
-- id), so all of one church's rows, and every statement of one request, stay on one
-- node. tests/storage/pg/test_citus_schema.py proves on the live schema that this
-- file names every table exactly once and that each distributed table has church_id
-- first in its primary key and in every unique index, and every foreign key between
-- distributed tables includes it.
--
-- Reference tables (a full copy on every node) are few and small by design, and
-- rarely written: each is named here with why it cannot be keyed by church.
-- Partitions follow their parent (and partitions made later by `koinonia migrate`
-- or the scheduler are distributed as they are attached).

CREATE EXTENSION IF NOT EXISTS citus;

-- Reference tables ------------------------------------------------------------------

-- Migration bookkeeping: one row per migration file, written only by `migrate`.
SELECT create_reference_table('schema_migration');
-- Inbound texts name the church's number, not the church: one row per church,
-- written when a church signs up.
SELECT create_reference_table('church_number_lookup');
-- Login and password resets start from an e-mail, before the church is known; one
-- row per staff user, written when a user joins or is removed.
SELECT create_reference_table('staff_email_lookup');
-- An API key names its prefix, not its church; one row per live key, written when a
-- key is created, rotated or revoked.
SELECT create_reference_table('api_key_lookup');
-- Archived months span every church (a partition holds all churches' rows of one
-- month): one row per month archived, written by `koinonia archive`.
SELECT create_reference_table('archive_month');

-- The tenant itself -----------------------------------------------------------------

SELECT create_distributed_table('church', 'id');

-- Distributed by church, colocated with it ------------------------------------------
-- In foreign-key order (a referenced table before the tables that reference it).

SELECT create_distributed_table('staff_user', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('api_key', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('branch', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('member_group', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('member', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('group_membership', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('member_opt_event', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('message_template', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('recurring_message', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('recurring_occurrence', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('message', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('message_recipient', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('conversation', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('conversation_message', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('staff_invitation', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('password_reset', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('mail_outbox', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('audit_log', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('webhook_endpoint', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('webhook_event', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('webhook_delivery', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('webhook_attempt', 'church_id', colocate_with => 'church');
-- Hot write paths, keyed by church rather than global (migration 0011): the receipt
-- dedupe (two rows per text) and the event log (a row per changing transaction).
SELECT create_distributed_table('provider_event', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('event_log', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('archive_file', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('archive_erasure', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('group_keyword', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('canned_reply', 'church_id', colocate_with => 'church');
SELECT create_distributed_table('media', 'church_id', colocate_with => 'church');
