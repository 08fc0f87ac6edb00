-- The upstream answer cache, one round trip per step. Server time (TIME) throughout, so
-- replicas with skewed clocks agree on freshness.
-- KEYS: entry (hash a=answer, t=stored at ms), lock, failure marker ("at_ms|json"),
--       the lock holder's answer as it streams (a stream of pieces, field p)
-- ARGV[1] = op: lookup | store | fail | piece
--   lookup: token, lock_ms, ttl_ms, since_ms (0 on the first lookup; a waiter's start after),
--           a lock to take over ("" for none: the caller saw it held by a process whose
--           heartbeat is gone, so it died mid-call; taken only if it still holds the lock),
--           the last piece read ("-" for none yet; "" for a caller that wants none)
--     -> {"hit", answer, now, false, pieces} | {"lead", stale|false, now}
--        | {"wait", stale|false, now, lock holder's token, pieces}
--        | {"failed", stale|false, now, marker, pieces}
--     pieces: {id, text, id, text, ...} after the one read last, of the call waited on (none
--     for a fresh hit: that call is over); taking the lead clears the old call's pieces
--   store: token, answer, keep_ms -> 1; releases the lock when `token` still holds it
--   fail: token, marker json, marker_ms -> 1; releases the lock when `token` still holds it
--   piece: token, text, keep_ms -> 1 when added (`token` still holds the lock), else 0
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local op = ARGV[1]

local function pieces(after)
  local out = {}
  if after == nil or after == '' then
    return out
  end
  local from = after == '-' and '-' or ('(' .. after)
  -- No COUNT: the holder writes at most MAX_REPLY_CHARS of pieces, so this is bounded, and
  -- a waiter handed the answer gets every piece before it.
  for _, e in ipairs(redis.call('XRANGE', KEYS[4], from, '+')) do
    out[#out + 1] = e[1]
    out[#out + 1] = e[2][2]
  end
  return out
end

local function release(token)
  if redis.call('GET', KEYS[2]) == token then
    redis.call('DEL', KEYS[2])
  end
end

if op == 'lookup' then
  local e = redis.call('HMGET', KEYS[1], 'a', 't')
  local since = tonumber(ARGV[5])
  if e[1] then
    local at = tonumber(e[2])
    -- fresh, or written by the call a waiter has been waiting for
    if since > 0 and at >= since then
      return {'hit', e[1], now, false, pieces(ARGV[7])}
    end
    if tonumber(now) - at < tonumber(ARGV[4]) then
      return {'hit', e[1], now}
    end
  end
  local stale = e[1] or false
  if since > 0 then
    local f = redis.call('GET', KEYS[3])
    if f then
      local bar = string.find(f, '|', 1, true)
      if bar and tonumber(string.sub(f, 1, bar - 1)) >= since then
        return {'failed', stale, now, string.sub(f, bar + 1), pieces(ARGV[7])}
      end
    end
  end
  local steal = ARGV[6] or ''
  local took = false
  if steal ~= '' and redis.call('GET', KEYS[2]) == steal then
    took = redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  else
    took = redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3])
  end
  if took then
    redis.call('DEL', KEYS[4])  -- a new call: the pieces of an earlier one are not its
    return {'lead', stale, now}
  end
  return {'wait', stale, now, redis.call('GET', KEYS[2]) or false, pieces(ARGV[7])}
elseif op == 'store' then
  redis.call('HSET', KEYS[1], 'a', ARGV[3], 't', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  release(ARGV[2])
  return 1
elseif op == 'fail' then
  redis.call('SET', KEYS[3], now .. '|' .. ARGV[3], 'PX', ARGV[4])
  release(ARGV[2])
  return 1
elseif op == 'piece' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then
    return 0  -- no longer this caller's call (its lock lapsed or was taken over)
  end
  redis.call('XADD', KEYS[4], '*', 'p', ARGV[3])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
  return 1
end
return redis.error_reply('unknown op')
