-- wrk script used by benches/load/run.sh: prints one machine-readable summary line at the end
-- (exact byte and request counts instead of wrk's rounded human-readable totals).
-- Latencies are in microseconds. Headers given with -H still apply.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d bytes=%.0f duration_us=%.0f p50_us=%.0f p90_us=%.0f p99_us=%.0f "
      .. "max_us=%.0f status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
