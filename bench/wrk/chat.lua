-- wrk script: POST /v1/chat/completions with a fixed JSON body and ResGov's headers.
--
--   wrk -t1 -c32 -d5s -s bench/wrk/chat.lua http://127.0.0.1:8080/v1/chat/completions -- MODE KEY AGENT
--
-- MODE is "unary" (non-streaming) or "stream" ("stream": true with usage in the last chunk).
-- KEY and AGENT go to "Authorization: Bearer" and "X-ResGov-Agent-ID" (the simulator ignores them,
-- so the direct-to-upstream run sends the very same request).
-- done() prints one line, prefixed "WRK_JSON ", that bench/run.py parses: latencies in microseconds.
-- wrk counts statuses >= 400 as errors.status; with a body this size nothing else is non-2xx.

local bodies = {
  unary = '{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    .. '"max_tokens":64}',
  stream = '{"model":"sim/gpt-bench","messages":[{"role":"user","content":"Say hello to the benchmark."}],'
    .. '"max_tokens":64,"stream":true,"stream_options":{"include_usage":true}}',
}

function init(args)
  local mode = args[1] or "unary"
  local body = bodies[mode]
  if body == nil then
    error("MODE must be unary or stream, got " .. tostring(mode))
  end
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. (args[2] or "none")
  wrk.headers["X-ResGov-Agent-ID"] = args[3] or "bench"
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_s":%.6f,"rps":%.2f,"bytes":%d,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.2f,"stdev_us":%.2f,'
      .. '"non2xx":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d}\n',
    summary.requests, secs, summary.requests / secs, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean, latency.stdev,
    e.status, e.connect, e.read, e.write, e.timeout))
end
