-- One channel's overall pace, shared by every process that sends for it: GCRA's virtual
-- scheduling with no burst. Each call reserves the next free slot, one interval after the
-- previous one, and says how long to wait for it; so N processes together send at the rate,
-- in the order they asked, and nobody polls.
--
-- KEYS[1] the next free slot (microseconds of Redis server time)
-- ARGV[1] interval between two sends, microseconds
--
-- Returns the microseconds to wait before sending (0: now). The key expires once its slot
-- has passed, so an idle channel costs nothing.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local slot = tonumber(redis.call("GET", KEYS[1]) or now)
if slot < now then slot = now end
local after = slot + interval
redis.call("SET", KEYS[1], after, "PX", math.ceil((after - now) / 1000) + 1)
return slot - now
