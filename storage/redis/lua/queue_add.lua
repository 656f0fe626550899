-- Church tag. KEYS: stream. ARGV: group, maxlen, payload... Creates the stream and
-- its group on first use (a deleted, drained stream comes back the same way).
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'j', ARGV[i])
end
return #ARGV - 2
