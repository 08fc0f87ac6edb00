-- Store a message's answer for replays and append the exchange to the context, atomically,
-- first writer wins.
--
-- KEYS[1] idempotency record of this message   KEYS[2] the user's context list
-- ARGV[1] the record   ARGV[2] its TTL, seconds
-- ARGV[3] the context entry ("" for none), the list kept to ARGV[4] entries for ARGV[5] s
--
-- Normally the caller holds the claim. When its claim was taken over (its heartbeat looked
-- gone: event-loop lag, a Redis blip) two requests may both answer; the first to finish
-- stores its record and the other gets that record back, so one message still has exactly
-- one reply and one context entry.
-- Returns false when stored, or the record already there.
local current = redis.call("GET", KEYS[1])
if current and string.sub(current, 1, 1) ~= "P" then return current end
redis.call("SET", KEYS[1], ARGV[1], "EX", ARGV[2])
if ARGV[3] ~= "" then
  redis.call("LPUSH", KEYS[2], ARGV[3])
  redis.call("LTRIM", KEYS[2], 0, tonumber(ARGV[4]) - 1)
  redis.call("EXPIRE", KEYS[2], ARGV[5])
end
return false
