-- KEYS: circuit, then buckets. ARGV: want, probe ms, then rate and capacity per
-- bucket (rate <= 0: no limit, but a pause still holds). Returns {granted, wait ms,
-- circuit state (0 closed, 1 open, 2 half-open), probe (0/1), the bucket that made
-- the longest wait (1-based; 0: the circuit or none)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local circuit = redis.call('HMGET', KEYS[1], 's', 'u', 'pu')
local state, probe = circuit[1] or 'closed', 0
if state == 'open' then
  local u = tonumber(circuit[2] or 0)
  if now < u then return {0, u - now, 1, 0, 0} end
  state = 'half_open'
  redis.call('HSET', KEYS[1], 's', 'half_open', 't', now)
end
if state == 'half_open' then
  local pu = tonumber(circuit[3] or 0)
  if now < pu then return {0, math.min(pu - now, 1000), 2, 0, 0} end
  redis.call('HSET', KEYS[1], 'pu', now + tonumber(ARGV[2]))
  probe, want = 1, 1
end
local grant, wait, limiter = want, 0, 0
local levels = {}
for i = 2, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', KEYS[i], 't', 'ts', 'p')
  local paused = tonumber(b[3] or 0)
  if now < paused then
    if paused - now > wait then wait, limiter = paused - now, i - 1 end
    grant = 0
  end
  if rate > 0 then
    local level = tonumber(b[1] or cap)
    local ts = tonumber(b[2] or now)
    level = math.min(cap, level + math.max(0, now - ts) * rate / 1000)
    levels[i] = level
    local need = math.min(want, math.max(1, math.floor(cap / 4)))
    if level < need then
      grant = 0
      local w = math.ceil((need - level) * 1000 / rate)
      if w > wait then wait, limiter = w, i - 1 end
    else
      grant = math.min(grant, math.floor(level))
    end
  end
end
if grant <= 0 then
  if probe == 1 then redis.call('HSET', KEYS[1], 'pu', 0) end
  local code = 0
  if state == 'half_open' then code = 2 end
  return {0, math.max(wait, 1), code, 0, limiter}
end
for i = 2, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if rate > 0 then
    redis.call('HSET', KEYS[i], 't', levels[i] - grant, 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.max(60000, math.ceil(cap * 2000 / rate)))
  end
end
local code = 0
if state == 'half_open' then code = 2 end
return {grant, 0, code, probe, 0}
