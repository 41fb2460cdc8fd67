"""`python mkat.py` as the README runs it: starts, answers, stops cleanly, reports bad config."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import wait_for

MKAT = Path(__file__).resolve().parent.parent / "mkat.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_until_exit(folder: Path, **env: str) -> subprocess.CompletedProcess:
    """Run mkat that is expected to stop at once (bad configuration); its exit, stdout, stderr."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MKAT_")}
    environment.update({"MKAT_PORT": str(free_port()), **env})
    return subprocess.run(
        [sys.executable, str(MKAT)], cwd=folder, env=environment, capture_output=True, text=True, timeout=15
    )


class Process:
    """mkat started as a user would, in its own folder, logging to a file."""

    def __init__(self, folder: Path, **env: str):
        self.folder = folder
        self.port = int(env.get("MKAT_PORT") or free_port())
        self.log_path = folder / f"mkat-{time.monotonic_ns()}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MKAT_")}
        environment.update({"MKAT_PORT": str(self.port), **env})
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(MKAT)],
            cwd=folder,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_until_healthy(self) -> None:
        def healthy():
            assert self.proc.poll() is None, self.output()
            try:
                return requests.get(self.url + "/health", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(healthy, timeout=15)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send the signal; return (exit status, seconds it took)."""
        started = time.monotonic()
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=10)
        self.log.close()
        return code, time.monotonic() - started

    def output(self) -> str:
        return self.log_path.read_text()

    def password(self) -> str:
        return re.search(r"event=generated_password username=admin password=(\S+)", self.output()).group(1)


@pytest.fixture
def started(tmp_path):
    processes = []

    def start(**env):
        process = Process(tmp_path, **env)
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def test_it_starts_with_no_configuration_serves_and_stops_on_sigterm(started, tmp_path):
    mkat = started()
    mkat.wait_until_healthy()
    password = mkat.password()
    auth = ("admin", password)
    created = requests.post(
        mkat.url + "/api/v1/services",
        json={"name": "cron", "monitors": [{"type": "Heartbeat", "intervalSeconds": 3600}]},
        auth=auth,
        timeout=5,
    )
    assert created.status_code == 201
    assert requests.get(mkat.url + "/api/v1/services", timeout=5).status_code == 401
    assert requests.get(mkat.url + "/", timeout=5).status_code == 200

    code, seconds = mkat.stop()
    # It should exit 0 within 5 s, having made its database in the working folder, without a traceback
    assert code == 0
    assert seconds < 5
    assert (tmp_path / "mkat.db").exists()
    assert "Traceback" not in mkat.output()
    assert "event=stopped" in mkat.output()

    again = started()
    again.wait_until_healthy()
    # It should keep the service and the generated password across the restart
    assert again.password() == password
    services = requests.get(again.url + "/api/v1/services", auth=auth, timeout=5).json()
    assert [s["name"] for s in services["items"]] == ["cron"]
    assert again.stop(signal.SIGINT)[0] == 0


def test_it_answers_the_requests_in_flight_when_stopped_and_keeps_them(started):
    mkat = started(MKAT_PASSWORD="pw")
    mkat.wait_until_healthy()
    body = {"name": "busy", "monitors": [{"type": "Heartbeat", "intervalSeconds": 3600}]}
    service = requests.post(mkat.url + "/api/v1/services", json=body, auth=("admin", "pw"), timeout=5).json()
    url = f"{mkat.url}/heartbeat/{service['monitors'][0]['token']}"
    answered, refused, wrong = [], [], []

    def hammer():
        session = requests.Session()
        while True:
            try:
                response = session.post(url, timeout=5)
            except requests.ConnectionError:
                refused.append(1)
                return
            if response.status_code == 200 and response.json()["received"]:
                answered.append(response.json())
            else:
                wrong.append(response.status_code)

    clients = [threading.Thread(target=hammer) for _ in range(4)]
    for client in clients:
        client.start()
    wait_for(lambda: len(answered) > 50)
    code, seconds = mkat.stop()
    for client in clients:
        client.join(timeout=10)
    # It should answer every request it took in whole, then refuse new ones, and exit 0 in time
    assert (code, wrong, len(refused)) == (0, [], 4)
    assert seconds < 5

    again = started(MKAT_PASSWORD="pw")
    again.wait_until_healthy()
    shown = requests.get(
        f"{again.url}/api/v1/services/{service['id']}", auth=("admin", "pw"), timeout=5
    ).json()
    # It should have kept the last heartbeat it confirmed
    last_confirmed = max(a["nextExpectedBefore"] for a in answered)
    assert shown["monitors"][0]["nextExpectedBefore"] >= last_confirmed
    again.stop()


def test_it_writes_json_logs_when_asked(started):
    mkat = started(MKAT_LOG_FORMAT="json", MKAT_PASSWORD="set-by-me")
    mkat.wait_until_healthy()
    mkat.stop()
    events = [json.loads(line) for line in mkat.output().splitlines()]
    assert [e["event"] for e in events] == ["started", "stopped"]
    assert events[0]["level"] == "info"
    assert events[0]["url"] == f"http://localhost:{mkat.port}/"
    # It should not print a password it did not generate
    assert "set-by-me" not in mkat.output()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MKAT_PORT": "eighty"}, "MKAT_PORT"),
        ({"MKAT_LOG_LEVEL": "LOUD"}, "MKAT_LOG_LEVEL"),
        ({"MKAT_MIN_INTERVAL_SECONDS": "-5"}, "MKAT_MIN_INTERVAL_SECONDS"),
        ({"MKAT_TRUST_PROXY": "maybe"}, "MKAT_TRUST_PROXY"),
        ({"MKAT_PUBLIC_URL": "mon.example.org"}, "MKAT_PUBLIC_URL"),
        ({"MKAT_BASE_PATH": "/a b"}, "MKAT_BASE_PATH"),
        ({"MKAT_DATABASE_PATH": "/no/such/folder/mkat.db"}, "MKAT_DATABASE_PATH"),
    ],
)
def test_a_bad_setting_stops_the_start_with_one_line_naming_it(tmp_path, env, variable):
    result = run_until_exit(tmp_path, **env)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mkat: {variable}")


def test_a_database_that_is_not_sqlite_is_refused_in_one_line(tmp_path):
    (tmp_path / "mkat.db").write_text("these are my notes, not a database " * 200)
    result = run_until_exit(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "mkat: MKAT_DATABASE_PATH: cannot use 'mkat.db': file is not a database"


def test_a_port_in_use_is_refused_in_one_line(started, tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_until_exit(tmp_path, MKAT_PORT=str(port))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"mkat: MKAT_PORT: cannot listen on 0.0.0.0:{port}")


def test_it_notifies_telegram_and_still_stops_at_once_during_a_long_poll(started, telegram):
    mkat = started(
        MKAT_PASSWORD="pw",
        MKAT_TELEGRAM_BOT_TOKEN=telegram.token,
        MKAT_TELEGRAM_API_URL=telegram.url,
        MKAT_TELEGRAM_CHAT_ID="4242",
    )
    mkat.wait_until_healthy()
    body = {"name": "web", "monitors": [{"type": "Webhook"}]}
    service = requests.post(mkat.url + "/api/v1/services", json=body, auth=("admin", "pw"), timeout=5).json()
    requests.post(f"{mkat.url}/webhook/{service['monitors'][0]['token']}/fail", timeout=5)
    [sent] = telegram.wait_for("sendMessage", 1)
    assert sent["text"].startswith("🔴 <b>web</b> is DOWN")
    wait_for(lambda: telegram.sent("getUpdates"))  # the bot is polling
    code, seconds = mkat.stop()
    assert (code, seconds < 5) == (0, True)
    assert "Traceback" not in mkat.output()


def test_a_second_mkat_on_the_same_database_stops_with_one_line(started, tmp_path):
    first = started(MKAT_PASSWORD="pw")
    first.wait_until_healthy()
    result = run_until_exit(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "mkat: MKAT_DATABASE_PATH: cannot use 'mkat.db': another mkat is already using this database"
    )
    assert first.stop()[0] == 0
