-- KEYS: one per limit, then, optionally, the church's read position
-- (storage/redis/read_positions.py), read here so a request learns it in the call
-- it makes anyway. ARGV: period_ms, then one limit per limit key.
-- Returns {allowed, limit, remaining, reset_ms, retry_after_ms} for the tightest
-- limit, and the position (as text; '0' when none is recorded) when it was asked for.
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local period = tonumber(ARGV[1])
local limits = #ARGV - 1
local allowed = 1
local retry_after = 0
local tats = {}
for i = 1, limits do
  local key = KEYS[i]
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
for i = 1, limits do
  local key = KEYS[i]
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
local verdict = {allowed, best_limit, best_remaining, math.ceil(best_reset), math.ceil(retry_after)}
if #KEYS > limits then
  verdict[6] = redis.call('GET', KEYS[limits + 1]) or '0'
end
return verdict
