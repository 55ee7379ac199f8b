-- Declares a topic: creates its meta hash unless it exists, then returns the topic's
-- {partitions, retention_ms, maxlen} as stored (an existing declaration wins).
-- KEYS[1]: the topic's meta hash.
-- ARGV[1]: partitions ('' = as it exists, else the default), ARGV[2]: the default partitions,
-- ARGV[3]: retention_ms ('' = none), ARGV[4]: maxlen ('' = none).
local cur = redis.call('HMGET', KEYS[1], 'partitions', 'retention_ms', 'maxlen')
if cur[1] then return cur end
local n = ARGV[1] ~= '' and ARGV[1] or ARGV[2]
redis.call('HSET', KEYS[1], 'partitions', n, 'retention_ms', ARGV[3], 'maxlen', ARGV[4],
           'version', 1)
return {n, ARGV[3], ARGV[4]}
