-- KEYS[1]: a church's read position. ARGV: position (an integer as text), ttl_ms.
-- Keeps the greater of the stored and the given position (writers race: a slow
-- one must not move it back), and renews the key's life.
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) >= tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
