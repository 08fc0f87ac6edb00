-- Store one deferred reply, at most one answer and at most one apology per message id.
--
-- KEYS[1] the user's inbox stream   KEYS[2] the user's hash: message id -> what was delivered
-- ARGV[1] message id  ARGV[2] kind (answer | apology)  ARGV[3] reply  ARGV[4] at (RFC 3339)
-- ARGV[5] TTL seconds  ARGV[6] max entries kept
--
-- An apology (attempts used up) is delivered only if nothing was; an answer only if no answer
-- was (so `bot dlq replay` still brings the real answer after an apology).
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
redis.call("EXPIRE", KEYS[1], ARGV[5])
redis.call("EXPIRE", KEYS[2], ARGV[5])
return id
