-- Claims records idle longer than the visibility timeout, with their delivery counts.
-- KEYS: the partition streams. ARGV[1]: group, ARGV[2]: consumer, ARGV[3]: min idle ms,
-- ARGV[4]: count (for all streams together), then one XAUTOCLAIM cursor per stream.
-- Returns per stream {next cursor, {{id, fields, delivery count}, ...}}.
local out = {}
local budget = tonumber(ARGV[4])
for i, key in ipairs(KEYS) do
  local cursor = ARGV[4 + i]
  local got = {}
  if budget > 0 then
    local r = redis.call('XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', budget)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if e[2] then  -- Redis 6.2 lists deleted entries without fields
        local p = redis.call('XPENDING', key, ARGV[1], e[1], e[1], 1)
        got[#got + 1] = {e[1], e[2], p[1][4]}
      end
    end
    budget = budget - #got
  end
  out[i] = {cursor, got}
end
return out
