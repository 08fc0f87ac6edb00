-- Store one deferred reply, at most one answer and at most one apology per message id.
--
-- KEYS[1] the user's inbox stream   KEYS[2] the user's hash: message id -> what was delivered
-- ARGV[1] message id  ARGV[2] kind (answer | apology)  ARGV[3] reply  ARGV[4] at (RFC 3339)
-- ARGV[5] TTL seconds  ARGV[6] max entries kept
--
-- An apology (attempts used up) is delivered only if nothing was; an answer only if no answer
-- was (so `bot dlq replay` still brings the real answer after an apology).
-- The hash is bounded as the stream is: past twice the entries the stream keeps, the messages
-- whose replies the stream has trimmed are forgotten (one pass every ~max deliveries; a job is
-- redelivered within minutes, never after a thousand later replies of its user).
-- Returns the new entry id, or false when this reply was already delivered.
local seen = redis.call("HGET", KEYS[2], ARGV[1])
if seen then
  local kind = cjson.decode(seen)["k"]
  if kind == "answer" or ARGV[2] == "apology" then return false end
end
local id = redis.call("XADD", KEYS[1], "MAXLEN", "~", ARGV[6], "*",
  "m", ARGV[1], "r", ARGV[3], "at", ARGV[4], "k", ARGV[2])
redis.call("HSET", KEYS[2], ARGV[1],
  cjson.encode({k = ARGV[2], r = ARGV[3], at = ARGV[4], id = id}))
if redis.call("HLEN", KEYS[2]) > 2 * tonumber(ARGV[6]) then
  local function parts(entry)  -- a stream id "ms-seq" as two numbers (exact below 2^53)
    local ms, seq = string.match(entry, "^(%d+)-(%d+)$")
    return tonumber(ms), tonumber(seq)
  end
  local oms, oseq = parts(redis.call("XRANGE", KEYS[1], "-", "+", "COUNT", 1)[1][1])
  local all = redis.call("HGETALL", KEYS[2])
  for i = 1, #all, 2 do
    local ms, seq = parts(cjson.decode(all[i + 1])["id"])
    if ms < oms or (ms == oms and seq < oseq) then redis.call("HDEL", KEYS[2], all[i]) end
  end
end
redis.call("EXPIRE", KEYS[1], ARGV[5])
redis.call("EXPIRE", KEYS[2], ARGV[5])
return id
