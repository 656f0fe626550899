-- One tag (a sending number's). KEYS: buckets. ARGV: want, then rate and capacity
-- per bucket (rate <= 0: no limit, but a pause still holds). send_admit without the
-- circuit: takes as many tokens as every bucket can give (at most want), or none.
-- Returns {granted, wait ms, the bucket that made the longest wait (1-based; 0: none)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local grant, wait, limiter = want, 0, 0
local levels = {}
for i = 1, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local b = redis.call('HMGET', KEYS[i], 't', 'ts', 'p')
  local paused = tonumber(b[3] or 0)
  if now < paused then
    if paused - now > wait then wait, limiter = paused - now, i end
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
      if w > wait then wait, limiter = w, i end
    else
      grant = math.min(grant, math.floor(level))
    end
  end
end
if grant <= 0 then return {0, math.max(wait, 1), limiter} end
for i = 1, #KEYS do
  local rate, cap = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if rate > 0 then
    redis.call('HSET', KEYS[i], 't', levels[i] - grant, 'ts', now)
    redis.call('PEXPIRE', KEYS[i], math.max(60000, math.ceil(cap * 2000 / rate)))
  end
end
return {grant, 0, 0}
