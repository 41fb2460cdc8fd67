"""Push endpoints over HTTP as cron jobs and scripts call them, and the workers on a real clock."""

from __future__ import annotations

import threading
import time

import pytest
import requests

import mkat
from conftest import Api, make_config, push, start_server, token_of, wait_for

HEARTBEAT = {"type": "Heartbeat", "intervalSeconds": 60, "gracePeriodSeconds": 10}


def test_a_heartbeat_by_get_or_post_marks_the_service_up(api, clock):
    service = api.create_service("cron", [HEARTBEAT])
    token = token_of(service, 1)
    for method in ("GET", "POST"):
        response = push(api, f"/heartbeat/{token}", method)
        # It should confirm, say when the next one is due (grace included), and make no alert
        assert response.status_code == 200
        assert response.json() == {
            "received": True,
            "nextExpectedBefore": mkat.iso(clock() + 70),
            "alertCreated": False,
        }
    shown = api.service(service["id"])
    assert (shown["state"], shown["monitors"][0]["lastCheckIn"]) == (1, mkat.iso(clock()))


def test_a_missed_heartbeat_makes_one_alert_and_the_next_heartbeat_recovers(api, clock):
    service = api.create_service("cron", [HEARTBEAT])
    token = token_of(service, 1)
    push(api, f"/heartbeat/{token}")
    clock.advance(70)
    for _ in range(3):
        mkat.job_check_deadlines(api.ctx, clock())
    [missed] = api.alerts()
    assert (missed["type"], missed["serviceName"], missed["monitorId"]) == (
        2,
        "cron",
        service["monitors"][0]["id"],
    )
    assert api.service(service["id"])["state"] == 2

    response = push(api, f"/heartbeat/{token}")
    # It should report the Recovery alert it made
    assert response.json()["alertCreated"] is True
    assert [a["type"] for a in api.alerts()] == [1, 2]


def test_webhooks_fail_and_recover(api):
    service = api.create_service("script")
    token = token_of(service)
    assert push(api, f"/webhook/{token}/fail").json() == {"received": True, "alertCreated": True}
    assert push(api, f"/webhook/{token}/fail").json() == {"received": True, "alertCreated": False}
    assert push(api, f"/webhook/{token}/recover").json() == {"received": True, "alertCreated": True}
    assert [a["type"] for a in api.alerts()] == [1, 0]


def test_64_concurrent_failures_make_exactly_one_alert(api):
    service = api.create_service("busy")
    url = api.url(f"/webhook/{token_of(service)}/fail")
    start = threading.Barrier(64)
    answers = []

    def fail():
        start.wait()
        answers.append(requests.post(url, timeout=30).json())

    threads = [threading.Thread(target=fail) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # It should accept all 64, report one alert among them, and record exactly one
    assert len(answers) == 64
    assert all(a["received"] for a in answers)
    assert sum(a["alertCreated"] for a in answers) == 1
    assert len(api.alerts()) == 1


def test_a_wrong_or_unknown_token_records_nothing(api):
    service = api.create_service("mixed", [{"type": 0}, HEARTBEAT])
    before = api.service(service["id"])
    wrong = push(api, f"/webhook/{token_of(service, 1)}/fail")
    assert (wrong.status_code, wrong.json()["code"]) == (400, "WRONG_MONITOR_TYPE")
    wrong = push(api, f"/heartbeat/{token_of(service, 0)}")
    assert (wrong.status_code, wrong.json()["code"]) == (400, "WRONG_MONITOR_TYPE")
    for path in ["/heartbeat/0123456789abcdef0123456789abcdef", "/webhook/short/fail", "/heartbeat/%00"]:
        unknown = push(api, path)
        assert (unknown.status_code, unknown.json()["code"]) == (404, "MONITOR_NOT_FOUND")
    assert api.service(service["id"]) == before
    assert api.alerts() == []


def test_pushes_to_a_paused_service_are_noted_but_change_nothing(api, clock):
    service = api.create_service("paused", [{"type": 0}, HEARTBEAT])
    api.post(f"/api/v1/services/{service['id']}/pause")
    assert push(api, f"/webhook/{token_of(service, 0)}/fail").json()["alertCreated"] is False
    beat = push(api, f"/heartbeat/{token_of(service, 1)}").json()
    assert beat == {"received": True, "nextExpectedBefore": None, "alertCreated": False}
    shown = api.service(service["id"])
    assert shown["state"] == 3
    assert [m["lastCheckIn"] for m in shown["monitors"]] == [mkat.iso(clock())] * 2
    assert [m["state"] for m in shown["monitors"]] == [0, 0]
    assert api.alerts() == []


# -- workers on the real clock ---------------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    """mkat with its workers running on the real clock."""
    ctx = mkat.Context(make_config(tmp_path), time.time)
    base_url, thread = start_server(ctx)
    workers = mkat.start_workers(ctx)
    yield Api(base_url, ctx)
    ctx.stop.set()
    for worker in [thread, *workers]:
        worker.join(timeout=5)
        assert not worker.is_alive()
    ctx.db.close()


def test_the_scheduler_catches_a_missed_heartbeat_within_a_second(live):
    service = live.create_service("fast", [{"type": 1, "intervalSeconds": 1, "gracePeriodSeconds": 0}])
    beat = push(live, f"/heartbeat/{token_of(service, 1)}").json()
    [alert] = wait_for(lambda: live.alerts(), timeout=5)
    late = mkat.parse_instant(alert["createdAt"]) - mkat.parse_instant(beat["nextExpectedBefore"])
    # It should notice the deadline passing within a second, and say so once
    assert alert["type"] == 2
    assert 0 <= late < 1.0
    assert live.service(service["id"])["state"] == 2


def test_the_scheduler_resumes_a_pause_within_a_second_of_its_end(live):
    service = live.create_service("maintenance")
    until = mkat.iso(time.time() + 1)
    live.post(f"/api/v1/services/{service['id']}/pause", json={"until": until, "autoResume": True})
    resumed = wait_for(lambda: (s := live.service(service["id"]))["state"] == 0 and s, timeout=5)
    late = mkat.parse_instant(resumed["stateChangedAt"]) - mkat.parse_instant(until)
    assert 0 <= late < 1.0
    assert resumed["pausedUntil"] is None


def test_a_restart_keeps_services_alerts_and_the_generated_password(tmp_path, clock):
    config = make_config(tmp_path, password=None)
    first = mkat.Context(config, clock)
    service_id = first.db.write(
        mkat.create_service,
        clock(),
        {"name": "kept"},
        [{"type": mkat.MonitorType.WEBHOOK, "interval_seconds": 60, "grace_seconds": 60}],
    )
    [monitor] = first.db.read(mkat.list_monitors, [service_id])
    first.db.write(mkat.record_webhook, clock(), monitor["token"], True)
    password = first.password
    first.db.close()

    second = mkat.Context(config, clock)
    # It should find the same service, state, alert and password after a restart
    assert second.password == password and second.password_generated
    assert len(password) >= 16
    assert second.db.read(mkat.find_service, service_id)["state"] == mkat.State.DOWN
    assert len(second.db.read(mkat.list_alerts, mkat.AlertFilter(), 10, 0)) == 1
    assert second.db.migrated_from == mkat.SCHEMA_VERSION
    second.db.close()
