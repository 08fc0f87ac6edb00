-- One channel's overall pace, shared by every process that sends for it: GCRA's virtual
-- scheduling with no burst. Each call reserves the next free slot, one interval after the
-- previous one, and says how long to wait for it; so N processes together send at the rate,
-- in the order they asked, and nobody polls. With a conversation, its own next-allowed time
-- too, so its pace outlives the process that sent its last message (a restart, a takeover).
--
-- KEYS[1] the channel's next free slot (microseconds of Redis server time)
-- KEYS[2] optional: the conversation's next-allowed time (same unit)
-- ARGV[1] interval between two sends of the channel, microseconds
-- ARGV[2] interval between two sends to the conversation, microseconds (with KEYS[2])
--
-- Returns the microseconds to wait before sending (0: now); negative when the conversation
-- may not send yet: nothing is reserved, ask again after that long. Keys expire once their
-- time has passed, so an idle channel or conversation costs nothing.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if KEYS[2] then
  local ready = tonumber(redis.call("GET", KEYS[2]) or now)
  if ready > now then return now - ready end
end
local interval = tonumber(ARGV[1])
local slot = tonumber(redis.call("GET", KEYS[1]) or now)
if slot < now then slot = now end
local after = slot + interval
if interval > 0 then
  redis.call("SET", KEYS[1], after, "PX", math.ceil((after - now) / 1000) + 1)
end
if KEYS[2] then
  local free = slot + tonumber(ARGV[2])
  redis.call("SET", KEYS[2], free, "PX", math.ceil((free - now) / 1000) + 1)
end
return slot - now
