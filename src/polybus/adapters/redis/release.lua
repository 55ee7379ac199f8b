-- Hands a leaving member's unacked records back (idle since the epoch: the next sweep claims
-- them, delivery counts unchanged) and deletes the consumer.
-- KEYS: the partition streams. ARGV[1]: group, ARGV[2]: consumer, ARGV[3]: holder (the
-- consumer that holds the records until a member claims them).
-- Returns 1.
for _, key in ipairs(KEYS) do
  while true do
    local pending = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 500, ARGV[2])
    if type(pending) ~= 'table' or pending.err or #pending == 0 then break end
    local args = {'XCLAIM', key, ARGV[1], ARGV[3], 0}
    for _, e in ipairs(pending) do args[#args + 1] = e[1] end
    args[#args + 1] = 'TIME'
    args[#args + 1] = 0
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
  end
  redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
end
return 1
