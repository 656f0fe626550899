-- KEYS: one per limit. ARGV: period_ms, then one limit per key.
-- Returns {allowed, limit, remaining, reset_ms, retry_after_ms} for the tightest limit.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local period = tonumber(ARGV[1])
local allowed = 1
local retry_after = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[i + 1])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at > now then
    allowed = 0
    local wait = allow_at - now
    if wait > retry_after then retry_after = wait end
  end
  tats[i] = {tat, new_tat, interval, limit}
end
local best_limit, best_remaining, best_reset = 0, -1, 0
for i, key in ipairs(KEYS) do
  local tat, new_tat, interval, limit = tats[i][1], tats[i][2], tats[i][3], tats[i][4]
  local used_until = tat
  if allowed == 1 then
    redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
    used_until = new_tat
  end
  local remaining = math.floor((now + period - used_until) / interval)
  if remaining < 0 then remaining = 0 end
  if best_remaining < 0 or remaining < best_remaining then
    best_limit, best_remaining, best_reset = limit, remaining, used_until - now
  end
end
return {allowed, best_limit, best_remaining, math.ceil(best_reset), math.ceil(retry_after)}
