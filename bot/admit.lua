-- Admission of one message in one round trip: idempotency lookup, GCRA rate limit, claim,
-- and (optionally) the user's conversation context.
--
-- KEYS[1] idempotency record of this message   KEYS[2] the user's GCRA state (its TAT)
-- KEYS[3] the user's context list
-- ARGV[1] emission interval T, microseconds     ARGV[2] burst (tau = T * burst)
-- ARGV[3] claim token                           ARGV[4] claim lease, milliseconds
-- ARGV[5] 1 to return the context list          ARGV[6] 1 to apply the limit
-- ARGV[7] a claim to take over: the caller saw it held by a process whose heartbeat is gone
--         (it died mid-answer); the message was admitted once already, so it is not counted
--         again. Empty for none. A claim that changed since (its holder finished, or another
--         waiter took it over first) is left alone.
-- ARGV[8] the finished record, when the answer was known before admission (/help, /echo):
--         stored at once instead of a claim, with ARGV[9] its TTL in seconds and ARGV[10]
--         the context entry to append (the list kept to ARGV[11] entries for ARGV[12]
--         seconds), so such a message costs one round trip in all
--
-- Returns {kind, a, b, ctx}:
--   {"done", record, remaining, reset_us}   answered before: replay it, not counted
--   {"pending", pttl, claim}      another request holds the claim: wait for its record
--   {"limited", retry_us, reset_us}
--   {"ok", remaining, reset_us, ctx}   claimed: answer it, then store the record
--   {"stored", remaining, reset_us}    admitted and answered (ARGV[8] given)
-- GCRA as in redis-cell: a request is allowed while TAT - now <= tau; each allowed request
-- moves TAT on by T. Time is Redis server time, so replicas' clocks do not matter.
local limit = ARGV[6] == "1"
local now, interval, tau, tat = 0, 0, 0, 0
if limit then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  interval = tonumber(ARGV[1])
  tau = interval * tonumber(ARGV[2])
  tat = tonumber(redis.call("GET", KEYS[2]) or now)
  if tat < now then tat = now end
end

local function standing()
  -- the limiter's state as it stands, nothing taken
  if not limit then return -1, 0 end
  return math.floor((tau + interval - (tat - now)) / interval), tat - now
end

local remaining, reset = -1, 0
local record = redis.call("GET", KEYS[1])
if record and string.sub(record, 1, 1) == "P" and record == ARGV[7] then
  remaining, reset = standing()
elseif record then
  if string.sub(record, 1, 1) == "P" then
    return {"pending", redis.call("PTTL", KEYS[1]), record}
  end
  local r, s = standing()
  return {"done", record, r, s}
elseif limit then
  local new_tat = tat + interval
  local allow_at = new_tat - tau - interval
  if now < allow_at then
    return {"limited", allow_at - now, tat - now}
  end
  redis.call("SET", KEYS[2], new_tat, "PX", math.ceil((new_tat - now) / 1000) + 1)
  remaining = math.floor((tau + interval - (new_tat - now)) / interval)
  reset = new_tat - now
end

if ARGV[8] and ARGV[8] ~= "" then
  redis.call("SET", KEYS[1], ARGV[8], "EX", ARGV[9])
  redis.call("LPUSH", KEYS[3], ARGV[10])
  redis.call("LTRIM", KEYS[3], 0, tonumber(ARGV[11]) - 1)
  redis.call("EXPIRE", KEYS[3], ARGV[12])
  return {"stored", remaining, reset}
end
redis.call("SET", KEYS[1], "P" .. ARGV[3], "PX", ARGV[4])
local ctx = {}
if ARGV[5] == "1" then ctx = redis.call("LRANGE", KEYS[3], 0, -1) end
return {"ok", remaining, reset, ctx}
