-- wrk script: POSTs Evolution webhooks, each with a unique data.key.id (else duplicates).
-- args: <body template file> <run tag> <path> [delay ms]; with a delay each connection
-- waits that long before each request (a steady offered rate instead of a flood); the template (demo.loadgen.build_webhook) holds
-- __MSGID__ and __DIGITS__ placeholders. done() prints one JSON line for bench/load.py.
local counter = 0
local thread_no = 0
local threads_made = 0

function setup(thread)
  threads_made = threads_made + 1
  thread:set("thread_no", threads_made)
end

function init(args)
  local fh = assert(io.open(args[1], "r"))
  template = fh:read("*a")
  fh:close()
  tag = args[2] or "0"
  path = args[3] or "/webhook/evolution/bench"
  headers = {["Content-Type"] = "application/json"}
  if args[4] then
    local ms = tonumber(args[4])
    delay = function() return ms end  -- wrk looks for delay() after init()
  end
end

function request()
  counter = counter + 1
  local id = string.format("3EB0%s%02d%09d", tag, thread_no, counter)
  local digits = string.format("55119%08d", (counter * 7919 + thread_no) % 10000)
  local body = template:gsub("__MSGID__", id):gsub("__DIGITS__", digits)
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d, "lat_p50_us": %d, "lat_p99_us": %d, "lat_max_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
