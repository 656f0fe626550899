-- Church tag. KEYS: stream, delayed set. ARGV: group, consumer, quantum, claim idle
-- ms, due per take, maxlen. Moves due retries onto the stream, takes entries idle
-- past claim-idle from dead consumers, then new ones, up to the quantum. Returns
-- {entries, more unread (0/1), next delayed due (ms or -1), pending, now}. A
-- church with nothing left at all loses its (empty) stream and group.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local group, consumer, quantum = ARGV[1], ARGV[2], tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[5]))
if #due > 0 and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
end
for _, entry in ipairs(due) do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], '*', 'j', entry)
  redis.call('ZREM', KEYS[2], entry)
end
local nxt = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next_due = -1
if #nxt > 0 then next_due = tonumber(nxt[2]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {{}, 0, next_due, 0, now} end
local taken = {}
local ok, claimed = pcall(redis.call, 'XAUTOCLAIM', KEYS[1], group, consumer, ARGV[4],
  '0-0', 'COUNT', quantum)
if not ok then
  redis.call('XGROUP', 'CREATE', KEYS[1], group, '0')
  claimed = {'0-0', {}}
end
for _, e in ipairs(claimed[2]) do
  if e and e[2] then taken[#taken + 1] = e end
end
local more = 0
if #taken < quantum then
  local want = quantum - #taken
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', want,
    'STREAMS', KEYS[1], '>')
  if read and read[1] then
    local fresh = read[1][2]
    for _, e in ipairs(fresh) do taken[#taken + 1] = e end
    if #fresh == want then
      local after = redis.call('XRANGE', KEYS[1], '(' .. fresh[#fresh][1], '+', 'COUNT', 1)
      if #after > 0 then more = 1 end
    end
  end
else
  local info = redis.call('XINFO', 'GROUPS', KEYS[1])
  for _, g in ipairs(info) do
    local fields = {}
    for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
    if fields['name'] == group and tonumber(fields['lag'] or 1) ~= 0 then more = 1 end
  end
end
local pending = tonumber(redis.call('XPENDING', KEYS[1], group)[1])
if pending == 0 and next_due < 0 and redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
end
local flat = {}
for _, e in ipairs(taken) do
  local payload = false
  for i = 1, #e[2], 2 do if e[2][i] == 'j' then payload = e[2][i + 1] end end
  flat[#flat + 1] = e[1]
  flat[#flat + 1] = payload
end
return {flat, more, next_due, pending, now}
