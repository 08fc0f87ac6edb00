-- POST /v1/messages "/echo ...", a fresh user and message id per request.
-- Argument: a run id (keeps ids unique across runs).
local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "common.lua")

function init(args)
  run_id = args[1] or "x"
end

function request()
  return wrk.format("POST", "/v1/messages", {["Content-Type"] = "application/json"},
    message("/echo hello bench"))
end
