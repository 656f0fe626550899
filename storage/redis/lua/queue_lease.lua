-- Ready-set tag. KEYS: ready set. ARGV: lease ms, jitter ms. Leases the church that
-- has waited longest among the due ones: {church, token, now}; or {false, next
-- score or -1, now} when none is due.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 1)
if #due == 0 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first == 0 then return {false, -1, now} end
  return {false, tonumber(first[2]), now}
end
local token = now + tonumber(ARGV[1]) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], token, due[1])
return {due[1], token, now}
