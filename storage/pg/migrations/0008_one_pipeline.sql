-- One send pipeline for every text.
--
-- A staff reply or an automatic answer (HELP, START, a group keyword) is a message
-- of one recipient, so it travels exactly the path a broadcast's recipients do:
-- the same recipient row and guarded transitions, consent checked when it is sent,
-- idempotency key, token buckets, circuit breaker, retries, dead letters and
-- reconciler. Its conversation_message row (outbound) shares its id, and the
-- thread reads its status from that recipient row, the one truth.
--
-- kind: 'broadcast' (what /v1/messages lists), 'reply' (staff), 'answer' (ours,
-- automatic). consent_exempt: sent whatever the member's opt-in state; only the
-- answers to HELP/INFO and the confirmation of START/UNSTOP/YES, as carriers allow.
ALTER TABLE message ADD COLUMN kind text NOT NULL DEFAULT 'broadcast'
    CHECK (kind IN ('broadcast', 'reply', 'answer'));
ALTER TABLE message ADD COLUMN conversation_id uuid;
ALTER TABLE message ADD COLUMN consent_exempt boolean NOT NULL DEFAULT false;
ALTER TABLE message ADD CONSTRAINT message_conversation
    CHECK ((kind = 'broadcast') = (conversation_id IS NULL));

-- Broadcast lists never see a church's replies, however many there are.
CREATE INDEX message_broadcasts ON message (church_id, created_at DESC, id DESC)
    WHERE kind = 'broadcast';
DROP INDEX message_list;

-- Replies still in flight on the earlier path become one-recipient messages, so
-- the reconciler sends them (nothing accepted is lost across the upgrade).
INSERT INTO message (church_id, id, created_at, body, target, status, recipient_count,
                     segments, encoding, from_number, created_by, materialized_at, kind,
                     conversation_id)
SELECT cm.church_id, cm.id, cm.created_at, cm.body,
       jsonb_build_object('member_ids', jsonb_build_array(c.member_id)), 'sending', 1,
       1, 'GSM-7', ch.phone_number, cm.sent_by, cm.created_at, 'reply', cm.conversation_id
FROM conversation_message cm
JOIN conversation c ON c.church_id = cm.church_id AND c.id = cm.conversation_id
JOIN church ch ON ch.id = cm.church_id
WHERE cm.direction = 'outbound' AND cm.status IN ('queued', 'sending')
  AND cm.provider_message_id IS NULL;

INSERT INTO message_recipient (church_id, message_id, id, created_at, member_id, status,
                               updated_at)
SELECT m.church_id, m.id, (substr(replace(m.id::text, '-', ''), 1, 20) || '000000000001')::uuid,
       m.created_at, c.member_id, 'queued', m.created_at
FROM message m
JOIN conversation c ON c.church_id = m.church_id AND c.id = m.conversation_id
WHERE m.kind = 'reply';
