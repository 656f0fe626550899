-- KEYS: history, epoch. ARGV: pub/sub channel, json-encoded channel name, event
-- json, epoch candidate, ttl seconds, event type, publish command (PUBLISH or, on a
-- cluster, SPUBLISH: see publish.lua). Finds the channel's epoch and
-- latest offset as `head` does (creating both for a channel without history, as
-- any subscriber's `head` would) and publishes the frame with a `~` offset.
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[4]
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[5])
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'x', '')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
local offset = '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then
  offset = last[1][1]
else
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then offset = info[i + 1] end
  end
end
local frame = '{"type":"event","channel":' .. ARGV[2] .. ',"offset":"' .. offset ..
  '","event":' .. ARGV[3] .. '}'
local header = ARGV[6] .. '\n' .. epoch .. '\n~' .. offset .. '\n'
return redis.call(ARGV[7] or 'PUBLISH', ARGV[1], header .. frame)
