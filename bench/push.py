#!/usr/bin/env python3
"""Throughput and latency of POST /heartbeat/{token}, and missed-heartbeat detection, under load.

Starts mkat (`python mkat.py`) on a fresh database, creates 10 000 heartbeat monitors, then drives
the heartbeat endpoint with wrk (one wrk thread, so it leaves a core to the server) picking a
random token per request. Prints requests/s, p50/p99/max latency, errors and the server's RSS for
each connection count, then measures how late missed heartbeats are detected while under load.

    apt-get install -y wrk
    python bench/push.py                      # 10 000 monitors, 8 and 64 connections, 10 s each
    python bench/push.py --connections 8 --duration 5 --close   # a new connection per request
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import requests
import running
from running import AUTH

LUA = """
local tokens = {%(tokens)s}
local headers = %(headers)s
math.randomseed(%(seed)d)

request = function()
  return wrk.format("POST", "/heartbeat/" .. tokens[math.random(#tokens)], headers)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%%d,"duration_us":%%d,"status":%%d,"connect":%%d,"read":%%d,' ..
    '"write":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_mkat(folder: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    extra = {"MKAT_THREADS": str(threads)} if threads else {}
    return running.start_mkat(folder, MKAT_MIN_INTERVAL_SECONDS="1", MKAT_MIN_GRACE_SECONDS="0", **extra)


def create_monitors(url: str, count: int, per_service: int = 100) -> list[str]:
    """count heartbeat monitors (an hour apart, so none expires during the run); their tokens."""
    tokens = []
    session = requests.Session()
    session.auth = AUTH
    for index in range(0, count, per_service):
        size = min(per_service, count - index)
        body = {
            "name": f"bench {index // per_service:04d}",
            "monitors": [{"type": "Heartbeat", "intervalSeconds": 3600}] * size,
        }
        response = session.post(url + "/api/v1/services", json=body, timeout=30)
        response.raise_for_status()
        tokens += [m["token"] for m in response.json()["monitors"]]
    return tokens


def run_wrk(url: str, script: Path, connections: int, duration: int) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["errors"] = sum(result[k] for k in ("status", "connect", "read", "write", "timeout"))
    return result


def measure_detection(url: str, samples: int) -> list[float]:
    """Seconds between each fast monitor's deadline and its MissedHeartbeat alert, sorted."""
    session = requests.Session()
    session.auth = AUTH
    deadlines = {}
    fast = [{"type": "Heartbeat", "intervalSeconds": 1, "gracePeriodSeconds": 0}]
    for i in range(samples):
        service = session.post(url + "/api/v1/services", json={"name": f"fast {i}", "monitors": fast}).json()
        beat = session.post(f"{url}/heartbeat/{service['monitors'][0]['token']}").json()
        deadlines[service["id"]] = instant(beat["nextExpectedBefore"])
        time.sleep(0.137)  # spread the deadlines over the scheduler's half-second tick
    lateness: dict[str, float] = {}
    give_up = time.monotonic() + 30
    query = {"type": "MissedHeartbeat", "pageSize": 100}
    while len(lateness) < samples and time.monotonic() < give_up:
        for alert in session.get(url + "/api/v1/alerts", params=query).json()["items"]:
            if alert["serviceId"] in deadlines:
                lateness[alert["serviceId"]] = instant(alert["createdAt"]) - deadlines[alert["serviceId"]]
        time.sleep(0.2)
    return sorted(lateness.values())


def instant(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def report_load(url: str, script: Path, pid: int, connection_counts: list[int], duration: int) -> None:
    print(f"{'conns':>5} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6} {'RSS MB':>7}")
    for connections in connection_counts:
        r = run_wrk(url, script, connections, duration)
        rss, _ = rss_mb(pid)
        p50, p99, worst = (r[key] / 1000 for key in ("p50_us", "p99_us", "max_us"))
        rps, errors = r["rps"], r["errors"]
        print(f"{connections:>5} {rps:>8.0f} {p50:>7.1f} {p99:>7.1f} {worst:>7.1f} {errors:>6} {rss:>7.1f}")
    print(f"peak RSS: {rss_mb(pid)[1]:.1f} MB")


def report_detection(url: str, script: Path, samples: int) -> None:
    """Missed-heartbeat lateness while wrk keeps 8 connections busy."""
    load = threading.Thread(target=run_wrk, args=(url, script, 8, 10))
    load.start()
    late = measure_detection(url, samples)
    load.join()
    if not late:
        print("missed-heartbeat detection: no alert seen")
        return
    ms = [round(x * 1000) for x in late]
    print(
        f"missed-heartbeat detection under load ({len(late)}/{samples} seen): late by "
        f"min {ms[0]} ms, median {ms[len(ms) // 2]} ms, max {ms[-1]} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--monitors", type=int, default=10_000)
    parser.add_argument("--connections", default="8,64", help="comma-separated connection counts")
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--threads", type=int, help="MKAT_THREADS for the server")
    parser.add_argument("--close", action="store_true", help="a new connection per request")
    parser.add_argument("--detection-samples", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is needed: apt-get install -y wrk")

    with tempfile.TemporaryDirectory(prefix="mkat-bench-") as tmp:
        folder = Path(tmp)
        proc, url = start_mkat(folder, args.threads)
        try:
            started = time.monotonic()
            tokens = create_monitors(url, args.monitors)
            print(f"created {len(tokens)} heartbeat monitors in {time.monotonic() - started:.1f} s")
            script = folder / "heartbeat.lua"
            headers = '{["Connection"] = "close"}' if args.close else "{}"
            quoted = ",".join(f'"{t}"' for t in tokens)
            script.write_text(LUA % {"tokens": quoted, "headers": headers, "seed": 42})
            print(f"RSS before load: {rss_mb(proc.pid)[0]:.1f} MB")
            report_load(url, script, proc.pid, [int(c) for c in args.connections.split(",")], args.duration)
            if args.detection_samples:
                report_detection(url, script, args.detection_samples)
            errors = [
                line for line in (folder / "mkat.log").read_text().splitlines() if "level=error" in line
            ]
            print(f"server errors logged: {len(errors)}" + (f" (first: {errors[0][:200]})" if errors else ""))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()
