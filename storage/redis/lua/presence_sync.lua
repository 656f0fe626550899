-- Who is here, for one church (storage/redis/presence.py).
-- KEYS: the church's presence hash (connection id -> "expiry_ms\tnode\tuser\tconversation\tsince").
-- ARGV: mode ('sync': this node's connections in the church are exactly the ones
-- listed, valid for ttl from now; 'read': only sweep), node id, ttl ms, realtime key
-- prefix of the church ('kn:rt:{c:<id>}:'), occurred_at, event id prefix (a uuid7
-- without its last 4 hex digits: the script numbers its events), publish command
-- (PUBLISH or SPUBLISH, see publish.lua), epoch candidate, history ttl seconds, then
-- per listed connection: id, user, conversation ('' for none), since ('' for none).
--
-- Entries whose expiry has passed (a node that died stopped refreshing them) are
-- removed by whoever runs next. The events that turn the stored state before the
-- call into the state after it are published from here, so that two nodes' changes
-- reach clients in the order Redis applied them. They are realtime only: published
-- with a '~' offset like typing_publish.lua, never added to a history. The channels'
-- keys are built from the prefix: they carry the church's hash tag, as KEYS[1]
-- does, so everything stays in its slot on a cluster.
local mode, node, ttl, prefix = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function parse(value)
  local expiry, owner, user, conv, since = string.match(value, '^(%d+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
  if not expiry then return nil end
  return {expiry = tonumber(expiry), node = owner, user = user, conv = conv, since = since}
end

local before, after, gone = {}, {}, {}
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  local entry = parse(raw[i + 1])
  if entry then before[raw[i]] = entry end
  if entry and entry.expiry > now and (mode ~= 'sync' or entry.node ~= node) then
    after[raw[i]] = entry
  else
    gone[#gone + 1] = raw[i]
  end
end
local written = {}
if mode == 'sync' then
  local expiry = now + ttl
  for i = 10, #ARGV, 4 do
    local entry = {expiry = expiry, node = node, user = ARGV[i + 1], conv = ARGV[i + 2], since = ARGV[i + 3]}
    after[ARGV[i]] = entry
    written[#written + 1] = ARGV[i]
    written[#written + 1] = expiry .. '\t' .. node .. '\t' .. entry.user .. '\t' .. entry.conv .. '\t' .. entry.since
  end
end
local removed = {}
for _, id in ipairs(gone) do
  if not after[id] then removed[#removed + 1] = id end
end
-- In slices: unpack's results live on Lua's C stack, a few thousand at most.
local function each_slice(command, items)
  for i = 1, #items, 1000 do
    redis.call(command, KEYS[1], unpack(items, i, math.min(i + 999, #items)))
  end
end
each_slice('HDEL', removed)
if #written > 0 then
  each_slice('HSET', written)
  -- No entry outlives now + ttl; the hash outlives them by as long again, so that
  -- whoever sweeps next still finds the entries of a node that died (and publishes
  -- their departure) rather than nothing at all.
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
end

-- Users online, and per conversation its viewers as the event's JSON list
-- (one per user, since their earliest view, ordered by since then user).
local function summary(entries)
  local online, views = {}, {}
  for _, e in pairs(entries) do
    online[e.user] = true
    if e.conv ~= '' then
      local v = views[e.conv]
      if not v then v = {}; views[e.conv] = v end
      if v[e.user] == nil or e.since < v[e.user] then v[e.user] = e.since end
    end
  end
  local lists = {}
  for conv, v in pairs(views) do
    local people = {}
    for user, since in pairs(v) do people[#people + 1] = {user, since} end
    table.sort(people, function(a, b)
      if a[2] ~= b[2] then return a[2] < b[2] end
      return a[1] < b[1]
    end)
    local parts = {}
    for i, p in ipairs(people) do
      parts[i] = '{"user_id":"' .. p[1] .. '","since":"' .. p[2] .. '"}'
    end
    lists[conv] = '[' .. table.concat(parts, ',') .. ']'
  end
  return online, lists
end

local online_before, lists_before = summary(before)
local online_after, lists_after = summary(after)

local heads = {}
local function head(channel)
  local found = heads[channel]
  if found then return found end
  local history, epoch_key = prefix .. 'h:' .. channel, prefix .. 'e:' .. channel
  local epoch = redis.call('GET', epoch_key)
  if (not epoch) or redis.call('EXISTS', history) == 0 then
    epoch = ARGV[8]
    redis.call('SET', epoch_key, epoch, 'EX', ARGV[9])
    redis.call('XADD', history, 'MAXLEN', '0', '*', 'x', '')
    redis.call('EXPIRE', history, ARGV[9])
  end
  local offset = '0-0'
  local last = redis.call('XREVRANGE', history, '+', '-', 'COUNT', 1)
  if last[1] then
    offset = last[1][1]
  else
    local info = redis.call('XINFO', 'STREAM', history)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then offset = info[i + 1] end
    end
  end
  found = {epoch, offset}
  heads[channel] = found
  return found
end

local published = 0
local function publish(kind, data, channels)
  published = published + 1
  local event = '{"type":"' .. kind .. '","id":"' .. ARGV[6] .. string.format('%04x', published % 65536) ..
    '","occurred_at":"' .. ARGV[5] .. '","data":' .. data .. '}'
  for _, channel in ipairs(channels) do
    local at = head(channel)
    local frame = '{"type":"event","channel":"' .. channel .. '","offset":"' .. at[2] ..
      '","event":' .. event .. '}'
    redis.call(ARGV[7], prefix .. 'p:' .. channel, kind .. '\n' .. at[1] .. '\n~' .. at[2] .. '\n' .. frame)
  end
end

local function sorted_keys(...)
  local seen, keys = {}, {}
  for _, tbl in ipairs({...}) do
    for k in pairs(tbl) do
      if not seen[k] then seen[k] = true; keys[#keys + 1] = k end
    end
  end
  table.sort(keys)
  return keys
end

for _, user in ipairs(sorted_keys(online_before, online_after)) do
  local status = nil
  if online_after[user] and not online_before[user] then status = 'online' end
  if online_before[user] and not online_after[user] then status = 'offline' end
  if status then
    publish('staff.presence', '{"user_id":"' .. user .. '","status":"' .. status .. '"}', {'inbox'})
  end
end
for _, conv in ipairs(sorted_keys(lists_before, lists_after)) do
  local list = lists_after[conv] or '[]'
  if list ~= (lists_before[conv] or '[]') then
    publish('conversation.viewers', '{"conversation_id":"' .. conv .. '","viewers":' .. list .. '}',
      {'conversation:' .. conv, 'inbox'})
  end
end

if mode == 'read' then
  local out = {}
  for _, e in pairs(after) do
    out[#out + 1] = e.user
    out[#out + 1] = e.conv
    out[#out + 1] = e.since
  end
  return out
end
return published
