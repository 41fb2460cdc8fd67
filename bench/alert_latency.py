#!/usr/bin/env python3
"""How fast an alert reaches Telegram: from a `fail` call's response to the Bot API's sendMessage.

Starts the loopback fake of the Telegram Bot API (tests/fakes.py) in a process of its own (so
the load generator does not slow its answers down) and mkat (`python mkat.py`) pointed at it,
creates 200 services with a webhook monitor each, fails them all from a few concurrent clients,
and measures per alert the time between the moment the `fail` request's response arrived and
the moment the fake received the sendMessage naming that service (CLOCK_MONOTONIC is one clock
for every process). Then checks that every alert arrived exactly once.

    python bench/alert_latency.py                     # 200 services, 8 clients
    python bench/alert_latency.py --services 500 --clients 1
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import running
from running import AUTH, ROOT

sys.path.insert(0, str(ROOT / "tests"))
from fakes import FakeTelegram

CHAT = 4242


def run_fake(pipe) -> None:
    """The fake Bot API's process: report its address, then answer "calls" with its call log."""
    telegram = FakeTelegram().start()
    pipe.send((telegram.url, telegram.token))
    while pipe.recv() == "calls":
        with telegram.cond:
            pipe.send(
                [(method, params, at) for method, params, at in telegram.calls if method == "sendMessage"]
            )
    telegram.stop()


def start_mkat(folder: Path, telegram: tuple[str, str]) -> tuple[subprocess.Popen, str]:
    return running.start_mkat(
        folder,
        MKAT_TELEGRAM_API_URL=telegram[0],
        MKAT_TELEGRAM_BOT_TOKEN=telegram[1],
        MKAT_TELEGRAM_CHAT_ID=str(CHAT),
    )


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients sending the failures")
    args = parser.parse_args()

    pipe, child_pipe = multiprocessing.Pipe()
    fake = multiprocessing.Process(target=run_fake, args=(child_pipe,), daemon=True)
    fake.start()
    telegram = pipe.recv()

    def sent_messages() -> list:
        pipe.send("calls")
        return pipe.recv()

    with tempfile.TemporaryDirectory(prefix="mkat-bench-") as tmp:
        proc, url = start_mkat(Path(tmp), telegram)
        try:
            session = requests.Session()
            session.auth = AUTH
            tokens = {}
            for i in range(args.services):
                body = {"name": f"svc-{i:04d}", "monitors": [{"type": "Webhook"}]}
                service = session.post(url + "/api/v1/services", json=body, timeout=10).json()
                tokens[service["name"]] = service["monitors"][0]["token"]

            answered: dict[str, float] = {}
            names = list(tokens)

            def client(mine: list[str]) -> None:
                own = requests.Session()
                for name in mine:
                    response = own.post(f"{url}/webhook/{tokens[name]}/fail", timeout=10)
                    answered[name] = time.monotonic()
                    assert response.json()["alertCreated"], response.text

            started = time.monotonic()
            clients = [
                threading.Thread(target=client, args=(names[i :: args.clients],)) for i in range(args.clients)
            ]
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
            fired_in = time.monotonic() - started
            give_up = time.monotonic() + 30
            while len(sent_messages()) < args.services and time.monotonic() < give_up:
                time.sleep(0.05)
            time.sleep(1.0)  # anything extra (a duplicate) would have arrived by now

            received: dict[str, list[float]] = {name: [] for name in names}
            for _, params, at in sent_messages():
                name = params["text"].split("<b>", 1)[1].split("</b>", 1)[0]
                received[name].append(at)
            latencies = [(received[n][0] - answered[n]) * 1000 for n in names if received[n]]
            duplicates = sum(len(times) - 1 for times in received.values() if len(times) > 1)
            lost = sum(1 for times in received.values() if not times)
            print(f"{args.services} failures from {args.clients} clients in {fired_in * 1000:.0f} ms")
            print(
                f"alert latency (fail response → sendMessage received): "
                f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
                f"max {max(latencies):.1f} ms, min {min(latencies):.1f} ms"
            )
            print(f"duplicates: {duplicates}, lost: {lost}")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            pipe.send("stop")
            fake.join(timeout=5)


if __name__ == "__main__":
    main()
