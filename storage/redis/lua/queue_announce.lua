-- Ready-set tag. KEYS: ready set, wake list. ARGV: church, score (ms; -1 = now),
-- wake cap. Adds the church or lowers its score (never raises it); pushes a wake
-- token when that makes the church due now.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local score = tonumber(ARGV[2])
if score < 0 then score = now end
local before = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], 'LT', score, ARGV[1])
if score <= now and (not before or tonumber(before) > now) then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
end
return now
