-- The broadcasts a member received (GET /v1/members/{id}/messages, the inbox's
-- contact panel; storage/pg/member_messages.py): a member's recipient rows, newest
-- first, found without scanning the church's recipients.
--
-- On the partitioned parent: every partition, present and future, gets its own.
--
-- The write cost, weighed against 0001's rule for this table: materializing a
-- broadcast now adds one entry per recipient to a second btree, and, unlike the
-- primary key (whose ids grow, so it fills at its right edge), these entries land
-- wherever each member's key sorts: scattered pages, more WAL. Status changes are
-- not affected: none of these columns ever changes after the row is made, so the
-- updates that follow (three or four a row) stay HOT as before. That is why status,
-- updated_at and error_code are read from the row, not carried in the index.
CREATE INDEX message_recipient_member
    ON message_recipient (church_id, member_id, created_at DESC, message_id DESC);
