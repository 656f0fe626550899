-- Media (MMS): files staff upload and files members text in (docs/protocol.md
-- "Media (MMS)"). The bytes live in the object store under media/<church>/<id>;
-- this row is what the church may reference. A message lists its files by id
-- (message.media_ids, in the order the provider gets them); a conversation message
-- keeps what it displays in its existing media column.
CREATE TABLE media (
    church_id     uuid NOT NULL REFERENCES church (id),
    id            uuid NOT NULL,
    content_type  text NOT NULL,
    size          integer NOT NULL CHECK (size > 0),
    object_key    text NOT NULL,
    sha256        text NOT NULL,
    source        text NOT NULL CHECK (source IN ('upload', 'inbound')),
    created_by    uuid,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (church_id, id)
);

ALTER TABLE message ADD COLUMN media_ids uuid[] NOT NULL DEFAULT '{}';
