-- The archive (storage/archive/archiver.py, docs/operations.md "Archive"): whole
-- months of the partitioned tables moved to the object store, one file per church,
-- month and table, then their partitions dropped.

-- One row per month the archiver has started: 'writing' while its files are being
-- written and verified, 'dropped' once the month's partitions are gone (in the
-- transaction that drops them). Reads take a month's rows from the archive only when
-- it is 'dropped', so a month is never read from both places. Partitions span every
-- church, so the month is the deployment's, not a church's.
CREATE TABLE archive_month (
    month       date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    state       text NOT NULL CHECK (state IN ('writing', 'dropped')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    dropped_at  timestamptz
);

-- The index: where one church's month of one table is, and what it must read back
-- as. A row is written only after its object was read back and verified, so every
-- row names a good file; an object without a row is a leftover of a killed run and
-- is deleted by the next one.
CREATE TABLE archive_file (
    church_id       uuid NOT NULL REFERENCES church (id),
    month           date NOT NULL,
    table_name      text NOT NULL
        CHECK (table_name IN ('message', 'message_recipient', 'conversation_message')),
    object_key      text NOT NULL,
    schema_version  integer NOT NULL,
    row_count       integer NOT NULL,
    bytes           bigint NOT NULL,
    sha256          text NOT NULL,
    verified_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, month, table_name)
);

-- Erased members' conversations whose text may still be in archive files: reads
-- blank those rows' text, and the archiver rewrites the files without it and then
-- deletes the row ("compaction").
CREATE TABLE archive_erasure (
    church_id        uuid NOT NULL REFERENCES church (id),
    conversation_id  uuid NOT NULL,
    erased_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, conversation_id)
);
