-- Notes and canned replies (docs/protocol.md "The inbox").
--
-- A note is a conversation_message that is never texted: direction 'note', written
-- by author_id (the staff user; NULL when an API key wrote it). It lives in the
-- thread's own table so the thread, its paging, the archive and erasure treat it
-- as they treat texts, with no second table to keep in step. The constraint is
-- replaced on the partitioned parent, which carries it to every partition.
ALTER TABLE conversation_message DROP CONSTRAINT conversation_message_direction_check;
ALTER TABLE conversation_message ADD CONSTRAINT conversation_message_direction_check
    CHECK (direction IN ('inbound', 'outbound', 'note'));
ALTER TABLE conversation_message ADD COLUMN author_id uuid;

-- Canned replies: a named body with merge fields, picked in the inbox and filled
-- for the conversation's member. Apart from message_template: those are broadcasts'
-- texts, listed and chosen for a different purpose.
CREATE TABLE canned_reply (
    church_id   uuid NOT NULL REFERENCES church (id),
    id          uuid NOT NULL,
    name        text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);
CREATE UNIQUE INDEX canned_reply_name ON canned_reply (church_id, lower(name));
