-- KEYS: history, epoch. ARGV: epoch candidate, ttl. Returns {epoch, latest offset}.
-- A channel without history gets a new epoch and an empty stream (an entry added
-- and trimmed at once), so its first publish keeps that epoch and a client that
-- subscribed while it was empty can recover from the returned offset.
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[2])
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'x', '')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then return {epoch, last[1][1]} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then return {epoch, info[i + 1]} end
end
return {epoch, '0-0'}
