-- KEYS: buckets. ARGV: pause ms. Nothing is granted from them until then.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local untl = now + tonumber(ARGV[1])
for i = 1, #KEYS do
  local p = tonumber(redis.call('HGET', KEYS[i], 'p') or 0)
  if untl > p then
    redis.call('HSET', KEYS[i], 'p', untl)
    redis.call('PEXPIRE', KEYS[i], math.max(60000, tonumber(ARGV[1]) * 2))
  end
end
return untl
