-- KEYS: counts hash, gate. ARGV: gate ms, then field/delta pairs.
-- Returns nil when the hash is missing (Redis lost it): the caller rebuilds it.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
local open = redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1])
local gate = 0
if open then gate = 1 end
return {gate, redis.call('HGETALL', KEYS[1])}
