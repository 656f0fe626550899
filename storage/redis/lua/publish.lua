-- KEYS: history, epoch. ARGV: pubsub channel, json-encoded channel name, event json,
-- maxlen, epoch candidate, event type, ttl seconds, publish command (PUBLISH on a
-- standalone Redis, SPUBLISH on a cluster: the channel carries the church's hash
-- tag, so it shares the slot of KEYS and a script may publish to it).
local epoch = redis.call('GET', KEYS[2])
if (not epoch) or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
end
local offset = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 't', ARGV[6], 'e', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
local frame = '{"type":"event","channel":' .. ARGV[2] .. ',"offset":"' .. offset ..
  '","event":' .. ARGV[3] .. '}'
redis.call(ARGV[8] or 'PUBLISH', ARGV[1], ARGV[6] .. '\n' .. epoch .. '\n' .. offset .. '\n' .. frame)
return {offset, epoch}
