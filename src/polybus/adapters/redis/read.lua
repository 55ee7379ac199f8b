-- Reads new records of the first partition that has any, trying them from ARGV[4] on.
-- KEYS: the partition streams. ARGV[1]: group, ARGV[2]: consumer, ARGV[3]: count,
-- ARGV[4]: the first partition to try (0-based).
-- Returns {partition, msgpack of the entries} or nil: one bulk string the client decodes in C,
-- where parsing ~10 RESP elements per entry in Python would cost more than the rest of a fetch.
local n = #KEYS
for i = 0, n - 1 do
  local p = (tonumber(ARGV[4]) + i) % n
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[p + 1], '>')
  if r then return {p, cmsgpack.pack(r[1][2])} end
end
return false
