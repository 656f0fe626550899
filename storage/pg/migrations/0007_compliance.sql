-- Compliance: keyword replies, quiet hours, and recipients held for their window.
--
-- church.help_text (0001) answers HELP / INFO; empty means the built-in text.
-- opt_in_text answers START / UNSTOP / YES; empty means the built-in text.
-- Quiet hours are a daily window of local wall-clock time, [start, end): scheduled
-- and recurring sends reach a member only inside it, in the member's time zone
-- when known, else the church's. start = end means no quiet hours.
ALTER TABLE church ADD COLUMN opt_in_text text NOT NULL DEFAULT '';
ALTER TABLE church ADD COLUMN quiet_hours_start time NOT NULL DEFAULT '08:00';
ALTER TABLE church ADD COLUMN quiet_hours_end time NOT NULL DEFAULT '21:00';

-- A recipient materialized outside its window stays 'queued' with the instant its
-- window opens; claiming leaves it alone until then and the scheduler re-enqueues
-- it at that time (clearing the column). The partial index holds only the rows
-- waiting, and status updates never touch the column, so they stay HOT.
ALTER TABLE message_recipient ADD COLUMN not_before timestamptz;
CREATE INDEX message_recipient_held ON message_recipient (not_before)
    WHERE not_before IS NOT NULL;
