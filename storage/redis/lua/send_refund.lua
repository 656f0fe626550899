-- KEYS: buckets. ARGV: tokens, then capacity per bucket. Gives back what was taken
-- but not used (recipients already sent or opted out), never past capacity.
for i = 1, #KEYS do
  local level = redis.call('HGET', KEYS[i], 't')
  if level then
    local cap = tonumber(ARGV[i + 1])
    redis.call('HSET', KEYS[i], 't', math.min(cap, tonumber(level) + tonumber(ARGV[1])))
  end
end
return 1
