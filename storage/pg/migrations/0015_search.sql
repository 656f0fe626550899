-- Conversation search (storage/pg/conversation_search.py): full-text with the
-- built-in 'simple' configuration (lower-cased words, no stemming and no stop words:
-- churches text in many languages, and a name is not English). The embedded
-- Postgres ships no contrib modules, so neither pg_trgm nor btree_gin.
--
-- The documents are stored, generated columns, not index expressions: to_tsvector
-- costs 10-20 us a row here, and the planner prices it as nearly free, so with an
-- expression index it would filter a common word by recomputing it over tens of
-- thousands of rows (hundreds of ms). Stored, a match costs about a microsecond
-- wherever it is checked (the walk over recent conversations, a page's rows). The
-- price: both tables are rewritten once by this migration, and each message's row
-- carries its words (about the size of its body again).

ALTER TABLE conversation_message
    ADD COLUMN body_search tsvector GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED;
-- On the partitioned parent: every partition, present and future, gets its own.
CREATE INDEX conversation_message_search ON conversation_message USING gin (body_search);

ALTER TABLE member
    ADD COLUMN name_search tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', first_name || ' ' || last_name)) STORED;
CREATE INDEX member_name_search ON member USING gin (name_search);
