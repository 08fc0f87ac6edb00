-- Shared by the bench scripts: per-thread ids and a JSON line of results for loadtests.bench.
-- wrk runs one Lua state per thread; setup() runs in the main state and numbers them.
local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

-- A message from a user nobody has seen before, so per-user limits never apply.
run_id = "x"
counter = 0
function message(text)
  counter = counter + 1
  local id = string.format("%s-%d-%d", run_id, tid or 0, counter)
  return string.format('{"user_id":"bench-%s","text":"%s","message_id":"m-%s"}', id, text, id)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
