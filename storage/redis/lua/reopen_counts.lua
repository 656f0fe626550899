-- KEYS: message counts hash. ARGV: recipients reopened. Moves them from
-- failed back to queued and clears completed; 0 when the hash is missing.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'failed', -tonumber(ARGV[1]))
redis.call('HINCRBY', KEYS[1], 'queued', tonumber(ARGV[1]))
redis.call('HDEL', KEYS[1], 'completed')
return 1
