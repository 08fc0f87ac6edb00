-- POST /v1/messages with one question every request asks (a cache hit once warmed),
-- a fresh user and message id per request. Arguments: a run id, the question.
local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "common.lua")
local question = "what is a pulsar?"

function init(args)
  run_id = args[1] or "x"
  question = args[2] or question
end

function request()
  return wrk.format("POST", "/v1/messages", {["Content-Type"] = "application/json"},
    message(question))
end
