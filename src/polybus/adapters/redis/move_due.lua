-- Moves due delayed records into their partition streams, then trims those streams.
-- KEYS[1]: the delayed sorted set, KEYS[2]: the topic's meta hash, KEYS[3..]: the partition
-- streams. ARGV[1]: now in epoch ms, ARGV[2]: the most records to move.
-- Returns the score of the next record still waiting, or -1.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
  local touched = {}
  for _, member in ipairs(due) do
    local rec = cmsgpack.unpack(member)
    local stream = KEYS[3 + rec[2]]
    redis.call('XADD', stream, '*', unpack(rec, 3))
    redis.call('ZREM', KEYS[1], member)
    touched[stream] = true
  end
  local meta = redis.call('HMGET', KEYS[2], 'retention_ms', 'maxlen')
  local now = redis.call('TIME')
  for stream in pairs(touched) do
    if meta[1] and meta[1] ~= '' then
      local minid = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(meta[1])
      redis.call('XTRIM', stream, 'MINID', '~', math.max(minid, 0))
    end
    if meta[2] and meta[2] ~= '' then redis.call('XTRIM', stream, 'MAXLEN', '~', meta[2]) end
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return nxt[2]
