-- KEYS: circuit. ARGV: successes, failures, threshold, cool-down ms, probe (0/1).
-- Returns {state code, open until ms, 1 when this call opened it, 1 when it closed it}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ok, bad = tonumber(ARGV[1]), tonumber(ARGV[2])
local c = redis.call('HMGET', KEYS[1], 's', 'f', 'u')
local state, failures, u = c[1] or 'closed', tonumber(c[2] or 0), tonumber(c[3] or 0)
if ok > 0 then
  if state ~= 'closed' or failures > 0 then
    redis.call('HSET', KEYS[1], 's', 'closed', 'f', 0, 'pu', 0, 't', now)
    if state ~= 'closed' then return {0, 0, 0, 1} end
  end
  return {0, 0, 0, 0}
end
if bad == 0 then
  if tonumber(ARGV[5]) == 1 then redis.call('HSET', KEYS[1], 'pu', 0) end
  local code = 0
  if state == 'open' then code = 1 elseif state == 'half_open' then code = 2 end
  return {code, u, 0, 0}
end
if state == 'open' then return {1, u, 0, 0} end
failures = failures + bad
if state == 'half_open' or failures >= tonumber(ARGV[3]) then
  u = now + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 's', 'open', 'f', 0, 'u', u, 'pu', 0, 't', now)
  redis.call('HINCRBY', KEYS[1], 'o', 1)
  return {1, u, 1, 0}
end
redis.call('HSET', KEYS[1], 'f', failures)
return {0, 0, 0, 0}
