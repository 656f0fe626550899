-- Ready-set tag. KEYS: ready set, wake list. ARGV: church, lease token, next score
-- (-1: nothing left, remove), wake cap. When somebody announced the church during
-- the lease its score is no longer the token: then it is only lowered, never removed.
-- Returns the set's lowest score afterwards (-1: empty).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
local nxt = tonumber(ARGV[3])
if current and tonumber(current) == tonumber(ARGV[2]) then
  if nxt < 0 then
    redis.call('ZREM', KEYS[1], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], nxt, ARGV[1])
  end
elseif nxt >= 0 then
  redis.call('ZADD', KEYS[1], 'LT', nxt, ARGV[1])
end
if nxt >= 0 and nxt <= now then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #first == 0 then return -1 end
return tonumber(first[2])
