"""Alerts reaching people: Telegram through the fake Bot API, e-mail, webhooks; retries; the bot."""

from __future__ import annotations

import pytest
import requests

import mkat
from conftest import CHAT, START, advance, pending_deliveries, push, settle, token_of, wait_for

TIME = "2030-03-17 17:46 UTC"  # START as the messages show it
MUTE_ROW = [
    {"text": "Mute 15m", "callback_data": "mute:{sid}:15"},
    {"text": "Mute 1h", "callback_data": "mute:{sid}:60"},
    {"text": "Mute 24h", "callback_data": "mute:{sid}:1440"},
]


def keyboard(service_id, alert_id=None, mute=True):
    rows = []
    if alert_id:
        rows.append([{"text": "Acknowledge", "callback_data": f"ack:{alert_id}"}])
    if mute:
        rows.append([{k: v.format(sid=service_id) for k, v in b.items()} for b in MUTE_ROW])
    return {"inline_keyboard": rows}


def fail(api, service, failed=True):
    response = push(api, f"/webhook/{token_of(service)}/{'fail' if failed else 'recover'}")
    assert response.status_code == 200
    return response.json()


# -- what Telegram receives ------------------------------------------------------------


def test_it_sends_a_failure_to_telegram_with_escaped_text_and_buttons(notifying, telegram):
    service = notifying.create_service('<b>web</b> & "co"', severity="High")
    fail(notifying, service)
    [sent] = telegram.wait_for("sendMessage", 1)
    [alert] = notifying.alerts()
    # It should send exactly this: every user string escaped, Ack and the three Mute buttons
    assert sent == {
        "chat_id": str(CHAT),
        "text": (
            '🔴 <b>&lt;b&gt;web&lt;/b&gt; &amp; "co"</b> is DOWN\n'
            "Failure · severity High\n"
            "Webhook reported a failure\n"
            f"🕒 {TIME}"
        ),
        "parse_mode": "HTML",
        "reply_markup": keyboard(service["id"], alert["id"]),
    }
    # It should read as the user would see it, and mark the alert dispatched
    message = telegram.messages[(str(CHAT), 1)]
    assert message["text"].startswith('🔴 <b>web</b> & "co" is DOWN')
    settle(notifying.ctx)
    assert notifying.alerts()[0]["dispatchedAt"] == mkat.iso(START)


def test_it_sends_a_recovery_as_a_new_message_and_resolves_the_failure_card(notifying, telegram, clock):
    service = notifying.create_service("web")
    fail(notifying, service)
    telegram.wait_for("sendMessage", 1)
    settle(notifying.ctx)
    clock.advance(7 * 60)
    fail(notifying, service, failed=False)
    sends = telegram.wait_for("sendMessage", 2)
    [edit] = telegram.wait_for("editMessageText", 1)
    # It should ring the phone with a recovery without buttons...
    assert "reply_markup" not in sends[1]
    assert sends[1]["text"].split("\n") == [
        "✅ <b>web</b> is back UP",
        "Recovery · severity Medium",
        "Back up after 7m down",
        "🕒 2030-03-17 17:53 UTC",
    ]
    # ...and turn the failure card into a resolved one, without buttons
    assert edit["message_id"] == 1
    assert edit["text"].endswith("✅ Resolved 2030-03-17 17:53 UTC after 7m down")
    assert edit["reply_markup"] == {"inline_keyboard": []}
    settle(notifying.ctx)
    assert len(telegram.sent("sendMessage")) == 2


def test_a_missed_heartbeat_says_so(notifying, telegram, clock):
    service = notifying.create_service(
        "cron", [{"type": "Heartbeat", "intervalSeconds": 60, "gracePeriodSeconds": 0}]
    )
    clock.advance(60)
    mkat.job_check_deadlines(notifying.ctx, clock())
    [sent] = telegram.wait_for("sendMessage", 1)
    assert sent["text"].splitlines()[:3] == [
        "🔴 <b>cron</b> is DOWN: missed heartbeat",
        "MissedHeartbeat · severity Medium",
        "No heartbeat within 1m (+0s grace); last check-in: never",
    ]
    assert service["id"] in str(sent["reply_markup"])


# -- buttons --------------------------------------------------------------------------------


def test_tapping_acknowledge_acknowledges_and_edits_the_card(notifying, telegram):
    service = notifying.create_service("web")
    fail(notifying, service)
    telegram.wait_for("sendMessage", 1)
    [alert] = notifying.alerts()
    query = telegram.tap(CHAT, 1, f"ack:{alert['id']}")
    [answer] = telegram.wait_for("answerCallbackQuery", 1)
    [edit] = telegram.wait_for("editMessageText", 1)
    # It should answer the tap, record who acknowledged, and drop the Ack button
    assert answer == {"callback_query_id": query, "text": "Acknowledged"}
    assert notifying.alerts()[0]["acknowledgedAt"] == mkat.iso(START)
    assert edit["text"].endswith(f"👤 Acknowledged by Ada (@ada) · {TIME}")
    assert edit["reply_markup"] == keyboard(service["id"])


def test_tapping_acknowledge_twice_says_it_is_done(notifying, telegram):
    service = notifying.create_service("web")
    fail(notifying, service)
    telegram.wait_for("sendMessage", 1)
    alert_id = notifying.alerts()[0]["id"]
    telegram.tap(CHAT, 1, f"ack:{alert_id}")
    telegram.tap(CHAT, 1, f"ack:{alert_id}")
    answers = telegram.wait_for("answerCallbackQuery", 2)
    assert [a["text"] for a in answers] == ["Acknowledged", "Already acknowledged"]


@pytest.mark.parametrize(("minutes", "label"), [(15, "Mute 15m"), (60, "Mute 1h"), (1440, "Mute 24h")])
def test_tapping_a_mute_button_mutes_and_edits_the_card(notifying, telegram, minutes, label):
    service = notifying.create_service("web")
    fail(notifying, service)
    [sent] = telegram.wait_for("sendMessage", 1)
    button = next(b for row in sent["reply_markup"]["inline_keyboard"] for b in row if b["text"] == label)
    telegram.tap(CHAT, 1, button["callback_data"])
    [answer] = telegram.wait_for("answerCallbackQuery", 1)
    [edit] = telegram.wait_for("editMessageText", 1)
    until = mkat.iso(START + minutes * 60)
    # It should mute for that long, say until when, and drop the Mute buttons
    assert notifying.service(service["id"])["mutedUntil"] == until
    assert answer["text"] == f"Muted until {mkat.clock_text(START + minutes * 60)}"
    assert edit["text"].endswith(f"🔕 Muted until {mkat.clock_text(START + minutes * 60)}")
    assert edit["reply_markup"] == keyboard(service["id"], notifying.alerts()[0]["id"], mute=False)


def test_a_stranger_tapping_buttons_changes_nothing(notifying, telegram):
    service = notifying.create_service("web")
    fail(notifying, service)
    telegram.wait_for("sendMessage", 1)
    alert_id = notifying.alerts()[0]["id"]
    telegram.tap(666, 1, f"ack:{alert_id}")
    telegram.tap(666, 1, f"mute:{service['id']}:60")
    reply_to(telegram, "/help")  # handled after the taps: they are done with
    # It should neither act nor answer
    assert notifying.alerts()[0]["acknowledgedAt"] is None
    assert notifying.service(service["id"])["mutedUntil"] is None
    assert telegram.sent("answerCallbackQuery") == []


# -- commands -----------------------------------------------------------------------------


def reply_to(telegram, text, chat=CHAT):
    before = len(telegram.sent("sendMessage"))
    telegram.say(chat, text)
    return telegram.wait_for("sendMessage", before + 1)[before:]


def test_status_counts_services_and_names_the_down_ones(notifying, telegram):
    for name in ["web", "db", "<cache>"]:
        notifying.create_service(name)
    fail(notifying, notifying.get("/api/v1/services?search=cache").json()["items"][0])
    fail(notifying, notifying.get("/api/v1/services?search=db").json()["items"][0])
    telegram.wait_for("sendMessage", 2)
    [reply] = reply_to(telegram, "/status")
    assert reply == {
        "chat_id": CHAT,
        "text": "📊 3 services: 1 unknown, 0 up, 2 down, 0 paused\n🔴 Down: <b>&lt;cache&gt;</b>, <b>db</b>",
        "parse_mode": "HTML",
    }


def test_list_shows_every_service_and_splits_long_lists(notifying, telegram):
    assert reply_to(telegram, "/list")[0]["text"].startswith("No services yet")
    for i in range(120):
        notifying.create_service(f"service {i:03d} " + "x" * 40)
    replies = reply_to(telegram, "/list@mkat_test_bot")
    wait_for(lambda: len(telegram.sent("sendMessage")) >= 3)
    replies = telegram.sent("sendMessage")[1:]
    # It should list all 120, in messages Telegram accepts
    lines = [line for r in replies for line in r["text"].splitlines()]
    assert len(lines) == 120
    assert lines[0] == "⚪ service 000 " + "x" * 40 + ": UNKNOWN"
    assert all(len(r["text"]) <= 4096 for r in replies)
    assert len(replies) == 2


@pytest.mark.parametrize(
    ("command", "name", "minutes"),
    [
        ("/mute web 1h", "web", 60),
        ('/mute "my web site" 15m', "my web site", 15),
        ("/mute my web site 2d", "my web site", 2880),
    ],
)
def test_mute_command_mutes_by_name(notifying, telegram, command, name, minutes):
    service = notifying.create_service(name)
    [reply] = reply_to(telegram, command)
    until = START + minutes * 60
    assert reply["text"] == f"🔕 Muted <b>{name}</b> until {mkat.clock_text(until)}"
    assert notifying.service(service["id"])["mutedUntil"] == mkat.iso(until)


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        ("/mute", "Usage: /mute"),
        ("/mute web", "Usage: /mute"),
        ("/mute web soon", "Use a duration like 15m, 2h or 1d"),
        ("/mute web 31d", "A mute lasts from 1 minute to 30 days"),
        ("/mute nothing 1h", "No service is named <b>nothing</b>"),
        ("/frobnicate", "I do not know that command"),
    ],
)
def test_mute_command_explains_what_is_wrong(notifying, telegram, command, answer):
    notifying.create_service("web")
    [reply] = reply_to(telegram, command)
    assert reply["text"].startswith(answer)
    assert notifying.get("/api/v1/services").json()["items"][0]["mutedUntil"] is None


def test_help_lists_the_commands(notifying, telegram):
    [reply] = reply_to(telegram, "/help")
    assert [line.split(":")[0] for line in reply["text"].splitlines()[1:]] == [
        "/status",
        "/list",
        "/mute &lt;service&gt; &lt;duration&gt;",
        "/help",
    ]


def test_a_stranger_learns_nothing_and_changes_nothing(notifying, telegram):
    service = notifying.create_service("web")
    for text in ["/status", "/list", "/mute web 1h", "/help"]:
        telegram.say(666, text)
    reply_to(telegram, "/help")  # handled after the stranger's: they are done with
    # It should answer none of them
    assert [m["chat_id"] for m in telegram.sent("sendMessage")] == [CHAT]
    assert notifying.service(service["id"])["mutedUntil"] is None


def test_it_remembers_the_last_update_it_handled(notifying, telegram):
    handled = telegram.say(CHAT, "/help")
    telegram.wait_for("sendMessage", 1)
    assert notifying.ctx.db.read(mkat.find_setting, "telegram_offset") == str(handled)


def test_it_never_handles_an_update_twice_across_restarts(start_mkat, telegram, tmp_path, clock):
    # A previous run handled update N and stopped before Telegram heard so: N comes again.
    db = mkat.Database(str(tmp_path / "mkat.db"))
    spec = [{"type": mkat.MonitorType.WEBHOOK, "interval_seconds": 60, "grace_seconds": 60}]
    service_id = db.write(mkat.create_service, clock(), {"name": "web"}, spec)
    handled = telegram.say(CHAT, "/mute web 1h")
    db.write(mkat.upsert_setting, "telegram_offset", str(handled))
    db.close()
    telegram.say(CHAT, "/help")
    running = start_mkat()
    [reply] = telegram.wait_for("sendMessage", 1)
    # It should skip N, answer only what came after it, and not mute
    assert reply["text"].startswith("<b>mkat</b>")
    assert running.api.service(service_id)["mutedUntil"] is None
    assert telegram.sent("getUpdates")[0]["offset"] == handled + 1


# -- reliable delivery ---------------------------------------------------------------------


def test_an_outage_of_three_failures_then_success_delivers_exactly_once(notifying, telegram, clock):
    telegram.fail_next("sendMessage", 500, "Internal Server Error", times=3)
    service = notifying.create_service("web")
    fail(notifying, service)
    for attempt, delay in enumerate([1, 2, 4], start=1):
        telegram.wait_for("sendMessage", attempt)
        wait_for(lambda n=attempt: delivery_rows(notifying.ctx)[0]["attempts"] == n)  # recorded
        assert mkat_channel(notifying)["lastError"] == "Internal Server Error"
        advance(notifying.ctx, clock, delay)
    telegram.wait_for("sendMessage", 4)
    settle(notifying.ctx)
    # It should have one message in the chat, after four attempts, and the channel healthy again
    assert len(telegram.messages) == 1
    assert notifying.alerts()[0]["dispatchedAt"] == mkat.iso(START + 7)
    assert mkat_channel(notifying)["lastError"] is None
    assert len(telegram.sent("sendMessage")) == 4


def mkat_channel(api):
    [channel] = api.get("/api/v1/channels").json()
    return channel


def delivery_rows(ctx):
    return ctx.db.read(lambda c: [dict(r) for r in c.execute("SELECT * FROM deliveries ORDER BY id")])


def test_it_waits_as_long_as_telegram_asks_after_a_429(notifying, telegram, clock):
    telegram.fail_next("sendMessage", 429, "Too Many Requests: retry after 7", retry_after=7)
    fail(notifying, notifying.create_service("web"))
    telegram.wait_for("sendMessage", 1)
    wait_for(lambda: delivery_rows(notifying.ctx)[0]["attempts"] == 1)
    # It should come back in 7 s, not after the 1 s backoff
    assert delivery_rows(notifying.ctx)[0]["next_attempt_at"] == START + 7
    advance(notifying.ctx, clock, 6.9)
    assert mkat.dispatch_due(notifying.ctx, clock(), submit=pytest.fail) > 0
    advance(notifying.ctx, clock, 0.1)
    telegram.wait_for("sendMessage", 2)
    settle(notifying.ctx)
    assert len(telegram.messages) == 1


@pytest.mark.parametrize(
    ("code", "description"),
    [(400, "Bad Request: chat not found"), (403, "Forbidden: bot was blocked by the user")],
)
def test_a_permanent_error_stops_retries_and_shows_on_the_channel(
    notifying, telegram, clock, code, description
):
    telegram.fail_next("sendMessage", code, description)
    fail(notifying, notifying.create_service("web"))
    telegram.wait_for("sendMessage", 1)
    settle(notifying.ctx)
    advance(notifying.ctx, clock, 3600)
    # It should give up at once, say why on the channel, and leave the alert undispatched
    assert mkat.dispatch_due(notifying.ctx, clock(), submit=pytest.fail) == 1.0
    assert len(telegram.sent("sendMessage")) == 1
    channel = mkat_channel(notifying)
    assert (channel["lastError"], channel["lastErrorAt"]) == (description, mkat.iso(START))
    assert notifying.alerts()[0]["dispatchedAt"] is None
    assert delivery_rows(notifying.ctx)[0]["failed_at"] == START


def test_it_gives_up_after_a_day_of_failures(notifying, telegram, clock):
    telegram.fail_next("sendMessage", 502, "Bad Gateway", times=1000)
    fail(notifying, notifying.create_service("web"))
    attempts = 0
    while delivery_rows(notifying.ctx)[0]["failed_at"] is None:
        attempts += 1
        telegram.wait_for("sendMessage", attempts)
        wait_for(lambda n=attempts: delivery_rows(notifying.ctx)[0]["attempts"] == n)
        row = delivery_rows(notifying.ctx)[0]
        if row["next_attempt_at"] is not None:
            assert row["next_attempt_at"] - clock() == min(300, 2 ** (attempts - 1))  # backoff, capped
            advance(notifying.ctx, clock, row["next_attempt_at"] - clock())
    # It should have tried for a day: 9 doubling waits (511 s), then every 5 min
    assert clock() - START <= 86_400
    assert attempts == 9 + (86_400 - 511) // 300 + 1


def test_a_pending_delivery_goes_out_after_a_restart(start_mkat, telegram):
    first = start_mkat()
    telegram.fail_next("sendMessage", 500, "Internal Server Error")
    fail(first.api, first.api.create_service("web"))
    telegram.wait_for("sendMessage", 1)
    wait_for(lambda: delivery_rows(first.ctx)[0]["attempts"] == 1)
    first.stop()
    second = start_mkat()
    second.ctx.clock.advance(1)
    second.ctx.deliveries_pending.set()
    telegram.wait_for("sendMessage", 2)
    settle(second.ctx)
    assert len(telegram.messages) == 1


def test_flapping_five_times_sends_ten_messages_no_more(notifying, telegram, clock):
    service = notifying.create_service("flappy")
    for _ in range(5):
        fail(notifying, service)
        clock.advance(30)
        fail(notifying, service, failed=False)
        clock.advance(30)
    assert len(notifying.alerts()) == 10
    telegram.wait_for("sendMessage", 10)
    settle(notifying.ctx)
    sends = telegram.sent("sendMessage")
    # It should send the ten in order, and only edit the five failure cards besides
    assert [s["text"].split("\n")[0] for s in sends] == [
        "🔴 <b>flappy</b> is DOWN",
        "✅ <b>flappy</b> is back UP",
    ] * 5
    assert len(sends) == 10
    assert sorted(e["message_id"] for e in telegram.sent("editMessageText")) == [1, 3, 5, 7, 9]


def test_a_mute_suppresses_then_one_still_down_notice_comes_when_it_ends(notifying, telegram, clock):
    service = notifying.create_service("web")
    notifying.post(f"/api/v1/services/{service['id']}/mute", json={"durationMinutes": 15})
    fail(notifying, service)
    [alert] = notifying.alerts()
    assert alert["suppressed"] is True
    assert pending_deliveries(notifying.ctx) == 0
    clock.advance(15 * 60)  # the scheduler ends the mute on its next pass
    [notice] = telegram.wait_for("sendMessage", 1)
    settle(notifying.ctx)
    assert notice["text"].split("\n")[0] == "🔴 <b>web</b> is still DOWN"
    assert notice["text"].endswith("⏰ The mute has ended; down for 15m")
    assert notice["reply_markup"] == keyboard(service["id"], alert["id"])
    assert len(telegram.sent("sendMessage")) == 1


def test_ending_a_mute_by_hand_while_up_sends_nothing(notifying, telegram):
    service = notifying.create_service("web")
    notifying.post(f"/api/v1/services/{service['id']}/mute", json={"durationMinutes": 15})
    fail(notifying, service)
    fail(notifying, service, failed=False)
    notifying.delete(f"/api/v1/services/{service['id']}/mute")
    settle(notifying.ctx)
    assert telegram.sent("sendMessage") == []


# -- contacts, several channels ---------------------------------------------------------------


@pytest.fixture
def receiver():
    from fakes import WebhookReceiver

    hook = WebhookReceiver()
    yield hook
    hook.stop()


@pytest.fixture
def mailbox():
    from fakes import Mailbox

    box = Mailbox()
    yield box
    box.stop()


@pytest.fixture
def with_email(start_mkat, mailbox):
    return start_mkat(
        smtp_host="127.0.0.1", smtp_port=mailbox.port, smtp_tls="none", smtp_from="mkat@example.org"
    )


def add_contact(api, name, *channels):
    contact = api.post("/api/v1/contacts", json={"name": name}).json()
    for channel in channels:
        response = api.post(f"/api/v1/contacts/{contact['id']}/channels", json=channel)
        assert response.status_code == 201, response.text
    return api.get(f"/api/v1/contacts/{contact['id']}").json()


def test_it_routes_an_alert_to_every_channel_of_every_contact(with_email, telegram, receiver, mailbox):
    api = with_email.api
    ops = add_contact(
        api,
        "ops",
        {"type": "Webhook", "configuration": {"url": receiver.url}},
        {"type": "Email", "configuration": {"address": "ops@example.org"}},
    )
    service = api.create_service("web")
    default_id = service["contactIds"][0]
    assert api.put(
        f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [default_id, ops["id"]]}
    ).json() == {"assigned": 2}
    fail(api, service)
    telegram.wait_for("sendMessage", 1)
    [posted] = receiver.wait_for(1)
    [mail] = mailbox.wait_for(1)
    settle(with_email.ctx)
    [alert] = api.alerts()
    # It should reach all three, once each, and call the alert dispatched
    assert posted == {
        "event": "alert",
        "alert": {**alert, "dispatchedAt": None},
        "service": {"id": service["id"], "name": "web", "state": 2, "severity": 1},
    }
    assert mail["to"] == ["ops@example.org"]
    assert "Subject: [mkat] web is DOWN" in mail["data"].decode()
    assert "Message:  Webhook reported a failure" in mail["data"].decode()
    assert alert["dispatchedAt"] == mkat.iso(START)


def test_a_disabled_channel_gets_nothing(notifying, telegram, receiver):
    ops = add_contact(
        notifying, "ops", {"type": "Webhook", "configuration": {"url": receiver.url}, "isEnabled": False}
    )
    service = notifying.create_service("web")
    notifying.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ops["id"]]})
    fail(notifying, service)
    settle(notifying.ctx)
    # It should record the alert but send nothing, and so never call it dispatched
    assert receiver.received == []
    assert telegram.sent("sendMessage") == []
    assert notifying.alerts()[0]["dispatchedAt"] is None


def test_disabling_a_channel_drops_what_was_still_waiting_for_it(notifying, telegram, clock):
    telegram.fail_next("sendMessage", 500, "Internal Server Error")
    fail(notifying, notifying.create_service("web"))
    telegram.wait_for("sendMessage", 1)
    wait_for(lambda: delivery_rows(notifying.ctx)[0]["attempts"] == 1)
    channel = mkat_channel(notifying)
    notifying.put(f"/api/v1/channels/{channel['id']}", json={"isEnabled": False})
    advance(notifying.ctx, clock, 1)
    settle(notifying.ctx)
    # It should send nothing more there, and not blame the channel for it
    assert len(telegram.sent("sendMessage")) == 1
    assert delivery_rows(notifying.ctx)[0]["last_error"] == "the channel was disabled"
    assert mkat_channel(notifying)["lastError"] == "Internal Server Error"  # its last real problem


def test_a_refused_recipient_is_permanent(with_email, mailbox):
    api = with_email.api
    ops = add_contact(api, "ops", {"type": "Email", "configuration": {"address": "nobody@refused.example"}})
    service = api.create_service("web")
    api.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ops["id"]]})
    fail(api, service)
    settle(with_email.ctx)
    channel = api.get(f"/api/v1/contacts/{ops['id']}").json()["channels"][0]
    assert channel["lastError"].startswith("Recipient refused")
    assert delivery_rows(with_email.ctx)[0]["failed_at"] is not None


def test_a_webhook_answering_500_is_retried_and_404_is_not(notifying, receiver, clock):
    receiver.replies = [(500, {}), (404, {})]
    ops = add_contact(notifying, "ops", {"type": "Webhook", "configuration": {"url": receiver.url}})
    service = notifying.create_service("web")
    notifying.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ops["id"]]})
    fail(notifying, service)
    receiver.wait_for(1)
    wait_for(lambda: delivery_rows(notifying.ctx)[0]["attempts"] == 1)
    advance(notifying.ctx, clock, 1)
    receiver.wait_for(2)
    settle(notifying.ctx)
    assert delivery_rows(notifying.ctx)[0]["last_error"] == "HTTP 404 from the webhook"
    assert delivery_rows(notifying.ctx)[0]["failed_at"] is not None


# -- channel tests -----------------------------------------------------------------------


def test_testing_a_channel_really_sends(notifying, telegram, receiver):
    [channel] = notifying.get("/api/v1/channels").json()
    result = notifying.post(f"/api/v1/channels/{channel['id']}/test").json()
    assert result == {"success": True, "message": "Test message sent"}
    [sent] = telegram.sent("sendMessage")
    assert sent["chat_id"] == str(CHAT)
    assert "test message" in sent["text"]
    ops = add_contact(notifying, "ops", {"type": "Webhook", "configuration": {"url": receiver.url}})
    hook = ops["channels"][0]
    assert (
        notifying.post(f"/api/v1/contacts/{ops['id']}/channels/{hook['id']}/test").json()["success"] is True
    )
    assert receiver.wait_for(1)[0]["event"] == "test"


def test_a_failing_channel_test_says_why_and_shows_it(notifying, telegram):
    telegram.missing_chats.add(str(CHAT))
    [channel] = notifying.get("/api/v1/channels").json()
    result = notifying.post(f"/api/v1/channels/{channel['id']}/test").json()
    assert result == {"success": False, "message": "Bad Request: chat not found"}
    assert mkat_channel(notifying)["lastError"] == "Bad Request: chat not found"


def test_the_bot_token_never_shows_in_an_error(start_mkat, telegram):
    closed = start_mkat(telegram_api_url="http://127.0.0.1:9")
    [channel] = closed.api.get("/api/v1/channels").json()
    result = closed.api.post(f"/api/v1/channels/{channel['id']}/test").json()
    assert result["success"] is False
    assert "ConnectionError" in result["message"]
    assert telegram.token not in result["message"]
    assert "<bot token>" in result["message"]
    assert telegram.token not in closed.api.get("/api/v1/channels").text


# -- live events ------------------------------------------------------------------------------


def read_events(response, count):
    """The first `count` events of a text/event-stream response, as (event, data) pairs."""
    events, fields = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if "event" in fields:
                events.append((fields["event"], fields["data"]))
                if len(events) == count:
                    return events
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            fields[key] = value
    return events


def test_the_event_stream_reports_changes_as_they_happen(notifying):
    import json

    service = notifying.create_service("web")
    with notifying.session.get(notifying.url("/api/v1/events/stream"), stream=True, timeout=5) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        fail(notifying, service)
        events = read_events(response, 3)
    kinds = [kind for kind, _ in events]
    data = {kind: json.loads(raw) for kind, raw in events}
    alert = notifying.alerts()[0]
    # It should stream the state change and the alert at once, with the SPEC's fields
    assert kinds[:2] == ["state_changed", "alert_created"]
    assert data["state_changed"] == {"serviceId": service["id"], "state": 2, "previousState": 0}
    assert data["alert_created"] == {
        "alertId": alert["id"],
        "serviceId": service["id"],
        "type": 0,
        "severity": 1,
        "suppressed": False,
    }
    # (the third: the alert went out to Telegram)
    assert data["alert_updated"] == {
        "alertId": alert["id"],
        "serviceId": service["id"],
        "acknowledgedAt": None,
        "dispatchedAt": alert["dispatchedAt"],
        "resolvedAt": None,
    }


def test_the_event_stream_needs_credentials_and_has_a_cap(notifying):
    assert requests.get(notifying.url("/api/v1/events/stream"), timeout=5).status_code == 401
    limit = notifying.ctx.hub.limit
    streams = [
        notifying.session.get(notifying.url("/api/v1/events/stream"), stream=True, timeout=5)
        for _ in range(limit)
    ]
    refused = notifying.get("/api/v1/events/stream")
    # It should refuse one stream too many, so browsers never take every thread
    assert (refused.status_code, refused.json()["code"]) == (503, "TOO_MANY_STREAMS")
    assert notifying.get("/api/v1/services").status_code == 200
    for stream in streams:
        stream.close()
    wait_for(lambda: len(notifying.ctx.hub.streams) == 0)
    with notifying.session.get(notifying.url("/api/v1/events/stream"), stream=True, timeout=5) as again:
        assert again.status_code == 200
