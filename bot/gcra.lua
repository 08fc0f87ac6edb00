-- One GCRA decision for one bucket (as admit.lua does for users, without the admission).
--
-- KEYS[1] the bucket's TAT (theoretical arrival time, microseconds of Redis server time)
-- ARGV[1] emission interval T, microseconds     ARGV[2] burst (tau = T * burst)
--
-- Returns {1, remaining, reset_us} when allowed, {0, retry_us, reset_us} when limited.
-- The key expires when the bucket is full again, so an idle bucket costs nothing.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call("GET", KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tau - interval
if now < allow_at then
  return {0, allow_at - now, tat - now}
end
redis.call("SET", KEYS[1], new_tat, "PX", math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((tau + interval - (new_tat - now)) / interval), new_tat - now}
