"""Shared fixtures: a fake clock, mkat in-process on a real socket, and an API client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

import mkat

PASSWORD = "test-password"
START = 1_900_000_000.0  # 2030-03-17T17:46:40Z: far from the real clock, so leaks show


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def wait_for(condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll until condition() is truthy and return it; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def make_config(tmp_path, **overrides: Any) -> mkat.Config:
    settings = {
        "host": "127.0.0.1",
        "database_path": str(tmp_path / "mkat.db"),
        "password": PASSWORD,
        "min_interval_seconds": 1,
        "min_grace_seconds": 0,
        "threads": 8,
        **overrides,
    }
    return mkat.Config(**settings)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def config(tmp_path) -> mkat.Config:
    return make_config(tmp_path)


@pytest.fixture
def ctx(config, clock) -> Iterator[mkat.Context]:
    context = mkat.Context(config, clock)
    yield context
    context.stop.set()
    context.db.close()


class Api:
    """A requests session against a running mkat, authenticated unless told otherwise."""

    def __init__(self, base_url: str, ctx: mkat.Context):
        self.base_url = base_url
        self.ctx = ctx
        self.session = requests.Session()
        self.session.auth = ("admin", PASSWORD)

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url(path), timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def create_service(self, name: str = "web", monitors: list | None = None, **fields: Any) -> dict:
        body = {"name": name, "monitors": monitors or [{"type": "Webhook"}], **fields}
        response = self.post("/api/v1/services", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def alerts(self, **filters: Any) -> list[dict]:
        response = self.get("/api/v1/alerts", params={"pageSize": 100, **filters})
        assert response.status_code == 200, response.text
        return response.json()["items"]

    def service(self, service_id: str) -> dict:
        response = self.get(f"/api/v1/services/{service_id}")
        assert response.status_code == 200, response.text
        return response.json()


def start_server(ctx: mkat.Context) -> tuple[str, threading.Thread]:
    server = mkat.HttpServer(ctx, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, args=(ctx.stop,), daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.port}", thread


@pytest.fixture
def api(ctx) -> Iterator[Api]:
    """mkat serving on a free port (no workers: tests run the jobs themselves)."""
    base_url, thread = start_server(ctx)
    yield Api(base_url, ctx)
    ctx.stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def push(api: Api, path: str, method: str = "POST") -> requests.Response:
    """A push call as curl would make it: no credentials."""
    return requests.request(method, api.url(path), timeout=10)


def token_of(service: dict, kind: int = 0) -> str:
    return next(m["token"] for m in service["monitors"] if m["type"] == kind)


# -- notifications ------------------------------------------------------------------

CHAT = 4242  # the chat of MKAT_TELEGRAM_CHAT_ID in these tests


@pytest.fixture
def telegram():
    from fakes import FakeTelegram

    fake = FakeTelegram().start()
    yield fake
    fake.stop()


class Running:
    """mkat in-process with its workers; stop() ends it like SIGTERM would."""

    def __init__(self, config: mkat.Config, clock: Any):
        self.ctx = mkat.Context(config, clock)
        base_url, self.server = start_server(self.ctx)
        self.workers = mkat.start_workers(self.ctx)
        self.api = Api(base_url, self.ctx)

    def stop(self) -> None:
        self.ctx.stop.set()
        self.server.join(timeout=5)
        mkat.stop_workers(self.ctx, self.workers, timeout=5)
        alive = [t.name for t in [self.server, *self.workers] if t.is_alive() and t.name != "mkat-telegram"]
        assert alive == []
        self.ctx.db.close()


@pytest.fixture
def start_mkat(tmp_path, clock, telegram):
    """Start mkat wired to the fake Bot API (and stop it at the end); call again to restart."""
    running: list[Running] = []

    def start(**overrides: Any) -> Running:
        settings = {
            "telegram_bot_token": telegram.token,
            "telegram_api_url": telegram.url,
            "telegram_chat_id": str(CHAT),
            **overrides,
        }
        running.append(Running(make_config(tmp_path, **settings), clock))
        return running[-1]

    yield start
    for mkat_run in running:
        if not mkat_run.ctx.stop.is_set():
            mkat_run.stop()


@pytest.fixture
def notifying(start_mkat) -> Api:
    """A running mkat whose default contact reaches CHAT on the fake Bot API."""
    return start_mkat().api


def pending_deliveries(ctx: mkat.Context) -> int:
    sql = "SELECT count(*) FROM deliveries WHERE next_attempt_at IS NOT NULL"
    return ctx.db.read(lambda c: c.execute(sql).fetchone()[0])


def settle(ctx: mkat.Context, timeout: float = 5.0) -> None:
    """Wait until every queued delivery has an outcome written down."""
    wait_for(lambda: pending_deliveries(ctx) == 0, timeout=timeout)


def advance(ctx: mkat.Context, clock: FakeClock, seconds: float) -> None:
    """Move the fake clock and ring the dispatcher, as time passing would."""
    clock.advance(seconds)
    ctx.deliveries_pending.set()
