"""The monitoring engine called directly: domain functions and job_* passes with a fake clock."""

from __future__ import annotations

import logging
import sqlite3
import threading

import pytest

import mkat
from conftest import wait_for
from mkat import AlertType, MonitorType, State

HEARTBEAT = {"type": MonitorType.HEARTBEAT, "interval_seconds": 60, "grace_seconds": 10}
WEBHOOK = {"type": MonitorType.WEBHOOK, "interval_seconds": 60, "grace_seconds": 60}


def create(ctx, name="svc", *monitors):
    """Create a service; return (service id, [monitor rows])."""
    service_id = ctx.db.write(mkat.create_service, ctx.clock(), {"name": name}, list(monitors or [HEARTBEAT]))
    return service_id, ctx.db.read(mkat.list_monitors, [service_id])


def service(ctx, service_id):
    return ctx.db.read(mkat.find_service, service_id)


def alerts(ctx, service_id=None):
    rows = ctx.db.read(mkat.list_alerts, mkat.AlertFilter(service_id=service_id), 100, 0)
    return [(AlertType(a["type"]), bool(a["suppressed"])) for a in reversed(rows)]


def heartbeat(ctx, token):
    return ctx.db.write(mkat.record_heartbeat, ctx.clock(), token)


def webhook(ctx, token, failed=True):
    return ctx.db.write(mkat.record_webhook, ctx.clock(), token, failed)


def check_deadlines(ctx):
    return mkat.job_check_deadlines(ctx, ctx.clock())


# -- heartbeats --------------------------------------------------------------------


def test_it_marks_a_service_up_on_its_first_heartbeat_without_an_alert(ctx, clock):
    service_id, [monitor] = create(ctx)
    result = heartbeat(ctx, monitor["token"])
    # It should be UP, with the next deadline a full interval plus grace away, and no alert
    assert service(ctx, service_id)["state"] == State.UP
    assert result.next_deadline == clock() + 70
    assert result.alert_id is None
    assert alerts(ctx) == []


def test_it_makes_exactly_one_missed_heartbeat_alert_and_recovers_on_the_next_heartbeat(ctx, clock):
    service_id, [monitor] = create(ctx)
    heartbeat(ctx, monitor["token"])

    clock.advance(69.999)
    assert check_deadlines(ctx) == 0  # It should wait for interval + grace
    clock.advance(0.001)
    assert check_deadlines(ctx) == 1
    clock.advance(600)
    assert check_deadlines(ctx) == 0  # It should not miss the same deadline twice
    assert service(ctx, service_id)["state"] == State.DOWN
    assert alerts(ctx) == [(AlertType.MISSED_HEARTBEAT, False)]

    result = heartbeat(ctx, monitor["token"])
    # It should recover with one Recovery alert
    assert result.alert_id is not None
    assert service(ctx, service_id)["state"] == State.UP
    assert alerts(ctx) == [(AlertType.MISSED_HEARTBEAT, False), (AlertType.RECOVERY, False)]


def test_it_counts_a_never_seen_heartbeat_from_its_creation(ctx, clock):
    service_id, [monitor] = create(ctx)
    assert monitor["deadline_at"] == clock() + 70
    clock.advance(70)
    check_deadlines(ctx)
    # It should go DOWN with a MissedHeartbeat alert that says it was never seen
    assert service(ctx, service_id)["state"] == State.DOWN
    [row] = ctx.db.read(mkat.list_alerts, mkat.AlertFilter(), 10, 0)
    assert row["type"] == AlertType.MISSED_HEARTBEAT
    assert row["message"] == "No heartbeat within 1m (+10s grace); last check-in: never"


def test_it_tells_how_long_a_service_was_down_when_it_recovers(ctx, clock):
    _, [monitor] = create(ctx)
    clock.advance(70)
    check_deadlines(ctx)
    clock.advance(3600 + 5 * 60)
    heartbeat(ctx, monitor["token"])
    [recovery, _missed] = ctx.db.read(mkat.list_alerts, mkat.AlertFilter(), 10, 0)
    assert recovery["message"] == "Back up after 1h 5m down"


def test_it_moves_an_armed_deadline_when_the_interval_changes(ctx, clock):
    service_id, [monitor] = create(ctx)
    heartbeat(ctx, monitor["token"])
    clock.advance(30)
    ctx.db.write(
        mkat.update_monitor, clock(), service_id, monitor["id"], {"interval_seconds": 300, "grace_seconds": 0}
    )
    clock.advance(200)
    assert check_deadlines(ctx) == 0  # 230 s after the check-in: within the new 300 s
    clock.advance(70)
    assert check_deadlines(ctx) == 1


def test_it_finds_due_deadlines_through_the_index(ctx):
    plan = " ".join(
        row[3]
        for row in ctx.db.read(lambda c: c.execute("EXPLAIN QUERY PLAN " + _due_sql(), (0, 1)).fetchall())
    )
    # It should search the deadline index, never scan every monitor
    assert "USING INDEX monitors_deadline" in plan
    assert "SCAN monitors" not in plan


def _due_sql():
    return "SELECT id FROM monitors WHERE deadline_at <= ? ORDER BY deadline_at LIMIT ?"


def test_it_misses_many_deadlines_in_batches(ctx, clock):
    monitors = [dict(HEARTBEAT, interval_seconds=60 + i % 5) for i in range(mkat.JOB_BATCH * 2 + 7)]
    for start in range(0, len(monitors), 100):
        create(ctx, f"svc {start}", *monitors[start : start + 100])
    clock.advance(80)
    # It should handle every due monitor in one pass, one alert per service
    assert check_deadlines(ctx) == len(monitors)
    assert len(alerts(ctx)) == 5


# -- webhooks and several monitors ------------------------------------------------------


def test_it_alerts_once_for_repeated_failures_and_once_for_the_recovery(ctx):
    _, [monitor] = create(ctx, "svc", WEBHOOK)
    assert webhook(ctx, monitor["token"]).alert_id is not None
    assert webhook(ctx, monitor["token"]).alert_id is None
    assert webhook(ctx, monitor["token"], failed=False).alert_id is not None
    assert webhook(ctx, monitor["token"], failed=False).alert_id is None
    assert alerts(ctx) == [(AlertType.FAILURE, False), (AlertType.RECOVERY, False)]


def test_it_makes_one_alert_when_two_monitors_fail(ctx):
    service_id, [first, second] = create(ctx, "svc", WEBHOOK, WEBHOOK)
    webhook(ctx, first["token"])
    webhook(ctx, second["token"])
    webhook(ctx, first["token"], failed=False)
    # It should stay DOWN while one monitor still fails: a passing monitor does not mask it
    assert service(ctx, service_id)["state"] == State.DOWN
    webhook(ctx, second["token"], failed=False)
    assert service(ctx, service_id)["state"] == State.UP
    assert alerts(ctx) == [(AlertType.FAILURE, False), (AlertType.RECOVERY, False)]


def test_it_rederives_the_state_when_a_monitor_is_deleted(ctx):
    service_id, [failing, passing] = create(ctx, "svc", WEBHOOK, WEBHOOK)
    webhook(ctx, passing["token"], failed=False)
    webhook(ctx, failing["token"])
    ctx.db.write(mkat.delete_monitor, ctx.clock(), service_id, failing["id"])
    # It should recover: the only failing monitor is gone
    assert service(ctx, service_id)["state"] == State.UP
    assert alerts(ctx) == [(AlertType.FAILURE, False), (AlertType.RECOVERY, False)]


def test_it_refuses_to_delete_the_last_monitor(ctx):
    service_id, [monitor] = create(ctx)
    with pytest.raises(mkat.MkatError) as refused:
        ctx.db.write(mkat.delete_monitor, ctx.clock(), service_id, monitor["id"])
    assert refused.value.code == "LAST_MONITOR"
    assert len(ctx.db.read(mkat.list_monitors, [service_id])) == 1


def test_it_refuses_a_token_of_another_monitor_type_and_records_nothing(ctx):
    _, [monitor] = create(ctx)
    with pytest.raises(mkat.MkatError) as refused:
        webhook(ctx, monitor["token"])
    assert refused.value.code == "WRONG_MONITOR_TYPE"
    assert ctx.db.read(mkat.find_monitor, monitor["id"])["last_check_in_at"] is None


# -- pause, resume, mute -------------------------------------------------------------


def test_it_never_takes_a_paused_service_down(ctx, clock):
    service_id, [beat, hook] = create(ctx, "svc", HEARTBEAT, WEBHOOK)
    ctx.db.write(mkat.pause_service, clock(), service_id, None, False)
    webhook(ctx, hook["token"])
    clock.advance(10_000)
    check_deadlines(ctx)
    result = heartbeat(ctx, beat["token"])
    # It should stay PAUSED, record the check-in time, and create no alert
    assert service(ctx, service_id)["state"] == State.PAUSED
    assert result.alert_id is None
    assert ctx.db.read(mkat.find_monitor, beat["id"])["last_check_in_at"] == clock()
    assert alerts(ctx) == []


def test_it_restarts_everything_from_unknown_on_resume(ctx, clock):
    service_id, [_, hook] = create(ctx, "svc", HEARTBEAT, WEBHOOK)
    webhook(ctx, hook["token"])
    ctx.db.write(mkat.pause_service, clock(), service_id, None, False)
    clock.advance(500)
    ctx.db.write(mkat.resume_service, clock(), service_id)
    # It should put the service and every monitor in UNKNOWN, the deadline a full wait from now
    assert service(ctx, service_id)["state"] == State.UNKNOWN
    monitors = ctx.db.read(mkat.list_monitors, [service_id])
    assert [m["state"] for m in monitors] == [State.UNKNOWN, State.UNKNOWN]
    assert monitors[0]["deadline_at"] == clock() + 70
    clock.advance(70)
    check_deadlines(ctx)
    assert alerts(ctx) == [(AlertType.FAILURE, False), (AlertType.MISSED_HEARTBEAT, False)]


def test_it_refuses_to_resume_a_service_that_is_not_paused(ctx):
    service_id, _ = create(ctx)
    with pytest.raises(mkat.MkatError) as refused:
        ctx.db.write(mkat.resume_service, ctx.clock(), service_id)
    assert refused.value.code == "SERVICE_NOT_PAUSED"


def test_it_resumes_automatically_when_asked_to(ctx, clock):
    auto, _ = create(ctx, "auto")
    manual, _ = create(ctx, "manual")
    ctx.db.write(mkat.pause_service, clock(), auto, clock() + 60, True)
    ctx.db.write(mkat.pause_service, clock(), manual, clock() + 60, False)
    clock.advance(59.9)
    assert mkat.job_auto_resume(ctx, clock()) == 0
    clock.advance(0.1)
    assert mkat.job_auto_resume(ctx, clock()) == 1
    # It should resume only the service that asked for it, and clear its end time
    assert service(ctx, auto)["state"] == State.UNKNOWN
    assert service(ctx, auto)["paused_until"] is None
    assert service(ctx, manual)["state"] == State.PAUSED


@pytest.mark.parametrize(
    ("until_offset", "auto_resume", "field"),
    [(-1, False, "until"), (0, False, "until"), (None, True, "autoResume")],
)
def test_it_refuses_a_pause_that_cannot_end(ctx, clock, until_offset, auto_resume, field):
    service_id, _ = create(ctx)
    until = None if until_offset is None else clock() + until_offset
    with pytest.raises(mkat.MkatError) as refused:
        ctx.db.write(mkat.pause_service, clock(), service_id, until, auto_resume)
    assert refused.value.code == "VALIDATION_ERROR"
    assert list(refused.value.details) == [field]
    assert service(ctx, service_id)["state"] == State.UNKNOWN


def test_it_records_alerts_of_a_muted_service_as_suppressed(ctx, clock):
    service_id, [monitor] = create(ctx, "svc", WEBHOOK)
    until = ctx.db.write(mkat.mute_service, clock(), service_id, 15, "deploying")
    assert until == clock() + 900
    webhook(ctx, monitor["token"])
    row = ctx.db.read(mkat.list_alerts, mkat.AlertFilter(), 1, 0)[0]
    # It should keep monitoring: the state changes, the alert is recorded but suppressed
    assert service(ctx, service_id)["state"] == State.DOWN
    assert (row["suppressed"], row["suppression_reason"]) == (1, "muted")
    assert not ctx.deliveries_pending.is_set()


def test_it_ends_a_mute_on_time_and_notes_a_service_still_down(ctx, clock):
    service_id, [monitor] = create(ctx, "svc", WEBHOOK)
    ctx.db.write(mkat.mute_service, clock(), service_id, 15, None)
    webhook(ctx, monitor["token"])
    clock.advance(899)
    assert mkat.job_end_mutes(ctx, clock()) == 0
    published = []
    ctx.db.on_commit = published.extend
    clock.advance(1)
    assert mkat.job_end_mutes(ctx, clock()) == 1
    # It should clear the mute and publish that the service is still down
    assert service(ctx, service_id)["muted_until"] is None
    assert published == [("mute_ended", {"serviceId": service_id, "stillDown": True})]
    webhook(ctx, monitor["token"], failed=False)
    assert alerts(ctx) == [(AlertType.FAILURE, True), (AlertType.RECOVERY, False)]


def test_it_rings_the_dispatcher_only_for_alerts_worth_sending(ctx):
    default = ctx.db.read(mkat.find_default_contact_id)
    config = {"url": "http://127.0.0.1:9/hook"}
    ctx.db.write(mkat.add_channel, ctx.clock(), default, mkat.ChannelType.WEBHOOK, config, True)
    _, [monitor] = create(ctx, "svc", WEBHOOK)
    webhook(ctx, monitor["token"], failed=False)
    assert not ctx.deliveries_pending.is_set()  # UNKNOWN → UP is not news
    webhook(ctx, monitor["token"])
    assert ctx.deliveries_pending.is_set()


def test_it_acknowledges_an_alert_once(ctx, clock):
    _, [monitor] = create(ctx, "svc", WEBHOOK)
    alert_id = webhook(ctx, monitor["token"]).alert_id
    ctx.db.write(mkat.acknowledge_alert, clock(), alert_id, "admin")
    with pytest.raises(mkat.MkatError) as refused:
        ctx.db.write(mkat.acknowledge_alert, clock() + 5, alert_id, "admin")
    assert refused.value.code == "ALREADY_ACKNOWLEDGED"
    assert ctx.db.read(mkat.find_alert, alert_id)["acknowledged_at"] == clock()


# -- the scheduler -------------------------------------------------------------------


def test_it_logs_a_failing_job_and_keeps_going(ctx, caplog):
    calls = []

    def job_that_breaks(context, now):
        calls.append(now)
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="mkat"):
        mkat.run_job(ctx, job_that_breaks)
        mkat.run_job(ctx, job_that_breaks)
    # It should have run both times and logged each failure with the job's name
    assert calls == [ctx.clock(), ctx.clock()]
    failures = [r for r in caplog.records if r.getMessage() == "job_failed"]
    assert [r.fields["job"] for r in failures] == ["job_that_breaks", "job_that_breaks"]


def test_a_rolled_back_operation_publishes_nothing(ctx):
    published = []
    ctx.db.on_commit = published.extend
    _, [monitor] = create(ctx, "svc", WEBHOOK)

    def fail_after_alert(c, now):
        mkat.record_webhook(c, now, monitor["token"], True)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        ctx.db.write(fail_after_alert, ctx.clock())
    assert published == []
    assert alerts(ctx) == []


def test_one_bad_operation_fails_alone_in_a_shared_commit(ctx):
    _, [monitor] = create(ctx, "svc", WEBHOOK)
    release = threading.Event()
    results = []

    def write(fn, *args):
        try:
            results.append(ctx.db.write(fn, *args))
        except Exception as exc:
            results.append(type(exc).__name__)

    # Hold the writer, queue three operations behind it, then let them go as one batch
    holder = threading.Thread(target=write, args=(lambda c: release.wait(5),))
    holder.start()
    wait_for(lambda: ctx.db._queue.qsize() == 0)
    operations = [(monitor["token"], True), ("f" * 32, True), (monitor["token"], False)]
    threads = [
        threading.Thread(target=write, args=(mkat.record_webhook, ctx.clock(), token, failed))
        for token, failed in operations
    ]
    for queued, thread in enumerate(threads, start=1):
        thread.start()
        wait_for(lambda n=queued: ctx.db._queue.qsize() == n)  # in this order
    release.set()
    for thread in [holder, *threads]:
        thread.join()
    # It should refuse the unknown token alone and keep the other two
    assert results.count("MkatError") == 1
    assert alerts(ctx) == [(AlertType.FAILURE, False), (AlertType.RECOVERY, False)]


def test_the_writer_survives_an_operation_that_breaks_its_transaction(ctx, caplog):
    def sabotage(c):
        c.execute("ROLLBACK")  # ends the writer's transaction behind its back

    with caplog.at_level(logging.ERROR, logger="mkat"), pytest.raises(sqlite3.OperationalError):
        ctx.db.write(sabotage)
    assert [r.getMessage() for r in caplog.records] == ["write_failed"]
    # It should go on writing afterwards
    service_id, _ = create(ctx, "after")
    assert service(ctx, service_id)["name"] == "after"
