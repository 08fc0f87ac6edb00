-- POST /v1/messages "/echo ..." at a fixed rate, whatever the answers take (open loop).
-- Arguments: a run id, the rate per wrk thread (requests/s).
--
-- Each thread keeps one schedule, a request every 1/rate s; whichever of its connections is
-- free takes the next slot and waits for it (wrk's delay(), in whole ms: a slot is at most
-- 1 ms early). hey's -q, the other candidate, paces each worker on a ticker of its own, all
-- started together: its 64 workers fire at once, so a "fixed rate" arrives in bursts of 64.
local dir = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(dir .. "common.lua")
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local interval = 1
local due = nil

function init(args)
  run_id = args[1] or "x"
  interval = 1000 / tonumber(args[2] or "1000")
end

function delay()
  local now = now_ms()
  due = (due or now) + interval
  local wait = due - now
  if wait < 0 then
    return 0 -- behind (every connection was busy): at once
  end
  return wait
end

function request()
  return wrk.format("POST", "/v1/messages", {["Content-Type"] = "application/json"},
    message("/echo hello bench"))
end
