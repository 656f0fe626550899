-- Keywords that join groups (storage/pg/group_keywords.py, docs/protocol.md
-- "Keywords that join groups"): a member texts the word (or JOIN <word>) and is
-- added to the group and answered through the one send pipeline.
--
-- keyword: as the church wrote it, for display. match_key: the form inbound texts
-- are compared with (upper case, computed in Python the way the SMS keywords are
-- normalized), so matching and uniqueness are case-insensitive without depending on
-- the database's locale for upper(). A deleted group takes its keywords with it.
CREATE TABLE group_keyword (
    church_id     uuid NOT NULL REFERENCES church (id),
    id            uuid NOT NULL,
    keyword       text NOT NULL,
    match_key     text NOT NULL,
    group_id      uuid NOT NULL,
    reply         text NOT NULL,
    repeat_reply  text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id),
    FOREIGN KEY (church_id, group_id) REFERENCES member_group (church_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX group_keyword_match ON group_keyword (church_id, match_key);
-- The group delete's cascade finds a group's keywords without a scan.
CREATE INDEX group_keyword_group ON group_keyword (church_id, group_id);
