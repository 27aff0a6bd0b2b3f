-- wrk script for `make bench`: POST a ~1 KB Anthropic Messages request and
-- print one machine-readable summary line (BENCHJSON {...}) at the end.
-- The Authorization header is the bench member's piapi key; the baseline
-- (proxy_pass) location replaces it with the provider key, the floor
-- ignores it.
local msg = string.rep("Refactor this function to use a hash map instead of a linear scan. ", 12)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer piapi-bench-user"
wrk.body = '{"model":"claude-bench-2024-01-01","max_tokens":256,"temperature":0.2,"stream":false,' ..
           '"system":"You are a careful coding assistant, bench.",' ..
           '"messages":[{"role":"user","content":"' .. msg .. '"}]}'

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
      '"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f,"mean_us":%.1f,"body_bytes":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max, latency.mean, #wrk.body))
end
