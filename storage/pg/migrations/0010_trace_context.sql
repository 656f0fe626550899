-- Trace context of a message (storage/process/tracing.py): the W3C traceparent of
-- the request that accepted it, so that provider receipts, which come back without
-- it, join the broadcast's trace. NULL when tracing was off. Nullable without a
-- default: adding it rewrites no partition.
ALTER TABLE message ADD COLUMN traceparent text;
