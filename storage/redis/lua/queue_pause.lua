-- Ready-set tag. KEYS: ready set. ARGV: church, until (ms). Raises a present
-- church's score (a throttled number: nothing of it can go before then).
return redis.call('ZADD', KEYS[1], 'XX', 'GT', ARGV[2], ARGV[1])
