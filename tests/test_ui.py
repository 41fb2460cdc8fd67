"""The web interface in Chromium, driven as a user would: Playwright with Debian's chromium.

Each test starts mkat on the real clock (with its workers and the fake Bot API), logs in,
and walks one journey. Screenshots of the main pages land in the test's temporary folder.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import requests

from conftest import CHAT, PASSWORD, Running, make_config, token_of

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    message = "browser tests need Debian's chromium: apt-get install -y chromium"
    if os.environ.get("MKAT_REQUIRE_BROWSER"):  # CI sets it: there, a missing browser is a failure
        raise RuntimeError(message)
    pytest.skip(message, allow_module_level=True)

from playwright.sync_api import Page, expect  # noqa: E402

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
STATIC = Path(__file__).resolve().parent.parent / "mkat_static"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": str(CHROMIUM), "args": CHROMIUM_ARGS}


@pytest.fixture
def browser_context_args(browser_context_args):
    return {**browser_context_args, "permissions": ["clipboard-read", "clipboard-write"]}


@pytest.fixture
def mkat(tmp_path, telegram):
    """mkat on the real clock, its default contact reaching the fake Bot API."""
    running = Running(
        make_config(
            tmp_path,
            telegram_bot_token=telegram.token,
            telegram_api_url=telegram.url,
            telegram_chat_id=str(CHAT),
        ),
        time.time,
    )
    yield running
    if not running.ctx.stop.is_set():
        running.stop()


@pytest.fixture
def ui(page: Page, mkat):
    """A page logged in to mkat; page errors fail the test."""
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"unexpected {dialog.type}: {dialog.message}"))
    page.goto(mkat.api.url("/"))
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#live")).to_have_text("live")
    yield page
    assert errors == []


def visit(page: Page, route: str) -> None:
    """Go to a route of the single page (#/...)."""
    page.goto(page.url.split("#")[0] + route)


def shoot(page: Page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=tmp_path / f"{name}.png", full_page=True)


# -- logging in ----------------------------------------------------------------------


def test_a_wrong_password_says_so_and_the_right_one_logs_in(page: Page, mkat, tmp_path):
    page.goto(mkat.api.url("/"))
    # It should ask for credentials, in its own form (never the browser's dialog)
    expect(page.get_by_role("heading", name="mkat")).to_be_visible()
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_have_text("Wrong user name or password.")
    shoot(page, tmp_path, "login")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Welcome to mkat")).to_be_visible()
    # It should keep the session for the tab, and forget it on log out
    page.reload()
    expect(page.get_by_role("heading", name="Welcome to mkat")).to_be_visible()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_label("Password")).to_be_visible()


def test_a_newcomer_is_told_what_to_do_first(ui: Page, tmp_path):
    expect(ui.get_by_role("link", name="Create your first service")).to_be_visible()
    shoot(ui, tmp_path, "welcome")
    ui.get_by_role("link", name="Services", exact=True).click()
    expect(ui.get_by_text("No services yet.")).to_be_visible()
    ui.get_by_role("link", name="Contacts", exact=True).click()
    expect(ui.get_by_role("heading", name="Default")).to_be_visible()


def test_a_401_anywhere_returns_to_the_login_page(ui: Page):
    ui.evaluate("sessionStorage.setItem('mkat.auth', btoa('admin:changed'))")
    ui.get_by_role("link", name="Alerts", exact=True).click()
    expect(ui.get_by_label("Password")).to_be_visible()
    ui.get_by_label("Password").fill(PASSWORD)
    ui.get_by_role("button", name="Log in").click()
    # It should come back where the user was going
    expect(ui.get_by_role("heading", name="Alerts")).to_be_visible()


# -- services --------------------------------------------------------------------------


def create_service(ui: Page, name: str, interval: str = "5m") -> None:
    visit(ui, "#/services/new")
    ui.get_by_label("Name").fill(name)
    ui.get_by_label("Expect a ping every").fill(interval)
    ui.get_by_role("button", name="Create service").click()
    expect(ui.get_by_role("heading", name=name)).to_be_visible()


def test_create_a_heartbeat_service_copy_its_url_and_watch_it_turn_up(ui: Page, mkat, tmp_path):
    create_service(ui, "nightly backup", "1d")
    service = mkat.api.get("/api/v1/services").json()["items"][0]
    url = service["monitors"][0]["heartbeatUrl"]
    # It should show the push URL ready to copy, and a curl line for the job
    expect(ui.get_by_label("Heartbeat URL")).to_have_value(url)
    expect(ui.get_by_label("Add to the end of your job")).to_have_value(
        f"curl -fsS -m 10 --retry 3 -X POST {url}"
    )
    ui.get_by_role("button", name="Copy").first.click()
    expect(ui.get_by_role("button", name="Copied ✓")).to_be_visible()
    assert ui.evaluate("navigator.clipboard.readText()") == url
    expect(ui.locator("h1 .badge")).to_have_text(re.compile("Unknown"))
    shoot(ui, tmp_path, "service")

    requests.post(url, timeout=5)
    # It should turn the badge UP by itself, from the event stream, without a reload
    expect(ui.locator("h1 .badge")).to_have_text(re.compile("Up"), timeout=5000)
    expect(ui.get_by_text("Expected every")).to_be_visible()


def test_the_form_shows_validation_messages_at_their_fields(ui: Page, mkat):
    mkat.api.create_service("taken")
    visit(ui, "#/services/new")
    interval_error = ui.locator("[data-error-for='monitors[0].intervalSeconds']")
    ui.get_by_label("Name").fill("taken")
    ui.get_by_label("Expect a ping every").fill("soon")
    ui.get_by_role("button", name="Create service").click()
    # It should check durations itself...
    expect(interval_error).to_have_text("Use a duration like 90s, 5m, 1h or 1d.")
    ui.get_by_label("Expect a ping every").fill("2w")
    ui.get_by_role("button", name="Create service").click()
    # ...show the API's messages beside the field they name...
    expect(interval_error).to_have_text("must be between 1 and 604800")
    expect(ui.get_by_label("Expect a ping every")).to_have_attribute("aria-invalid", "true")
    ui.get_by_label("Expect a ping every").fill("1w")
    ui.get_by_role("button", name="Create service").click()
    # ...a taken name too, and forget the messages that no longer apply
    expect(ui.locator("[data-error-for='name']")).to_have_text("is taken")
    expect(interval_error).to_be_empty()
    assert mkat.api.get("/api/v1/services").json()["totalCount"] == 1


def test_edit_a_service_and_its_monitors(ui: Page, mkat):
    service = mkat.api.create_service("web", [{"type": "Heartbeat", "intervalSeconds": 300}])
    visit(ui, f"#/services/{service['id']}/edit")
    ui.get_by_label("Name").fill("web front")
    ui.get_by_label("Description (optional)").fill("nginx <b>on</b> the NAS")
    ui.get_by_label("Severity").select_option("High")
    ui.get_by_label("Expect a ping every").fill("10m")
    ui.get_by_role("button", name="Add another monitor").click()
    ui.locator("[name='monitors[1].type']").select_option("0")
    ui.get_by_role("button", name="Save").click()
    expect(ui.get_by_role("heading", name="web front")).to_be_visible()
    saved = mkat.api.service(service["id"])
    # It should save the fields, change the existing monitor, and add the new one
    assert (saved["name"], saved["description"], saved["severity"]) == (
        "web front",
        "nginx <b>on</b> the NAS",
        2,
    )
    assert [(m["type"], m["intervalSeconds"]) for m in saved["monitors"]] == [(1, 600), (0, 60)]
    expect(ui.locator(".description")).to_have_text("nginx <b>on</b> the NAS")
    # ...and remove one again
    ui.get_by_role("link", name="Edit").click()
    ui.get_by_role("button", name="Remove this monitor").first.click()
    ui.get_by_role("button", name="Save").click()
    expect(ui.get_by_role("heading", name="Monitors")).to_be_visible()
    assert [m["type"] for m in mkat.api.service(service["id"])["monitors"]] == [0]


def test_search_and_filter_services(ui: Page, mkat, tmp_path):
    for name in ["web", "db", "cache"]:
        mkat.api.create_service(name)
    db = mkat.api.get("/api/v1/services?search=db").json()["items"][0]
    requests.post(mkat.api.url(f"/webhook/{token_of(db)}/fail"), timeout=5)
    ui.get_by_role("link", name="Services", exact=True).click()
    expect(ui.locator("table.list tbody tr")).to_have_count(3)
    shoot(ui, tmp_path, "services")
    ui.get_by_label("Search").fill("ca")
    expect(ui.locator("table.list tbody tr")).to_have_count(1)
    expect(ui.get_by_role("link", name="cache")).to_be_visible()
    ui.get_by_label("Search").fill("")
    ui.get_by_label("State").select_option("Down")
    expect(ui.locator("table.list tbody tr")).to_have_count(1)
    expect(ui.get_by_role("link", name="db")).to_be_visible()


def test_delete_a_service_after_confirming(ui: Page, mkat):
    service = mkat.api.create_service("doomed")
    visit(ui, f"#/services/{service['id']}")
    ui.get_by_role("button", name="Delete").click()
    # It should ask first, and do nothing when cancelled
    ui.get_by_role("button", name="Cancel").click()
    assert mkat.api.get(f"/api/v1/services/{service['id']}").status_code == 200
    ui.get_by_role("button", name="Delete").click()
    ui.get_by_role("button", name="Delete service").click()
    expect(ui.get_by_role("heading", name="Services")).to_be_visible()
    assert mkat.api.get(f"/api/v1/services/{service['id']}").status_code == 404


# -- alerts, pause, mute -----------------------------------------------------------------


def test_a_failure_shows_on_the_dashboard_and_is_acknowledged_there(ui: Page, mkat, telegram, tmp_path):
    service = mkat.api.create_service("web")
    requests.post(mkat.api.url(f"/webhook/{token_of(service)}/fail"), timeout=5)
    # It should show the service down and the waiting alert, live
    down = ui.get_by_role("region", name="Down now")
    expect(down.get_by_role("link", name="web")).to_be_visible()
    waiting = ui.get_by_role("region", name="Alerts waiting for someone")
    expect(waiting.get_by_text("Webhook reported a failure")).to_be_visible()
    shoot(ui, tmp_path, "dashboard")
    waiting.get_by_role("button", name="Acknowledge").click()
    expect(ui.get_by_text("Alert acknowledged.")).to_be_visible()
    expect(waiting.get_by_text("No unacknowledged alerts.")).to_be_visible()
    assert mkat.api.alerts()[0]["acknowledgedAt"] is not None
    # It should edit the Telegram card too
    telegram.wait_for("editMessageText", 1)


def test_pause_with_an_end_time_then_resume(ui: Page, mkat):
    service = mkat.api.create_service("web")
    visit(ui, f"#/services/{service['id']}")
    ui.get_by_role("button", name="Pause…").click()
    until = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() + 2 * 3600))
    ui.get_by_label("Until (optional, your local time)").fill(until)
    ui.get_by_label("Resume by itself at that time").check()
    ui.get_by_role("button", name="Pause", exact=True).click()
    expect(ui.locator("h1 .badge")).to_have_text(re.compile("Paused"))
    expect(ui.get_by_text("(resumes by itself)")).to_be_visible()
    saved = mkat.api.service(service["id"])
    assert saved["autoResume"] is True
    assert abs(time.mktime(time.strptime(until, "%Y-%m-%dT%H:%M")) - _epoch(saved["pausedUntil"])) < 1
    ui.get_by_role("button", name="Resume").click()
    expect(ui.locator("h1 .badge")).to_have_text(re.compile("Unknown"))


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def test_a_pause_in_the_past_is_refused_in_the_dialog(ui: Page, mkat):
    service = mkat.api.create_service("web")
    visit(ui, f"#/services/{service['id']}")
    ui.get_by_role("button", name="Pause…").click()
    ui.get_by_label("Until (optional, your local time)").fill("2001-01-01T00:00")
    ui.get_by_role("button", name="Pause", exact=True).click()
    expect(ui.locator("[data-error-for='until']")).to_have_text("must be in the future")
    assert mkat.api.service(service["id"])["state"] == 0


@pytest.mark.parametrize(("choice", "minutes"), [("1 hour", 60), ("custom", 150)])
def test_mute_then_unmute(ui: Page, mkat, choice, minutes):
    service = mkat.api.create_service("web")
    visit(ui, f"#/services/{service['id']}")
    ui.get_by_role("button", name="Mute…").click()
    if choice == "custom":
        ui.get_by_label("Other:").check()
        ui.get_by_label("Duration").fill("2h 30m")
    else:
        ui.get_by_label(choice).check()
    ui.get_by_label("Reason (optional)").fill("deploying")
    ui.get_by_role("button", name="Mute", exact=True).click()
    expect(ui.get_by_role("button", name="Unmute")).to_be_visible()
    muted = mkat.api.service(service["id"])
    assert abs(_epoch(muted["mutedUntil"]) - time.time() - minutes * 60) < 60
    assert muted["muteReason"] == "deploying"
    ui.get_by_role("button", name="Unmute").click()
    expect(ui.get_by_role("button", name="Mute…")).to_be_visible()
    assert mkat.api.service(service["id"])["mutedUntil"] is None


def test_the_alerts_page_filters_and_acts(ui: Page, mkat, tmp_path):
    web, db = mkat.api.create_service("web"), mkat.api.create_service("db")
    for service in (web, db):
        requests.post(mkat.api.url(f"/webhook/{token_of(service)}/fail"), timeout=5)
    requests.post(mkat.api.url(f"/webhook/{token_of(web)}/recover"), timeout=5)
    ui.get_by_role("link", name="Alerts", exact=True).click()
    expect(ui.locator("li.alert")).to_have_count(3)
    shoot(ui, tmp_path, "alerts")
    ui.get_by_label("Service").select_option("db")
    expect(ui.locator("li.alert")).to_have_count(1)
    ui.get_by_role("button", name="Mute…").click()
    ui.get_by_role("button", name="Mute", exact=True).click()
    expect(ui.get_by_text(re.compile("^Muted until"))).to_be_visible()
    assert mkat.api.service(db["id"])["mutedUntil"] is not None
    ui.get_by_label("Service").select_option("")
    ui.get_by_label("Type").select_option("Recovery")
    expect(ui.locator("li.alert")).to_have_count(1)
    expect(ui.locator("li.alert")).to_contain_text("Back up after")


# -- contacts ---------------------------------------------------------------------------


def test_contacts_channels_and_a_channel_test(ui: Page, mkat, telegram, tmp_path):
    ui.get_by_role("link", name="Contacts", exact=True).click()
    default = ui.locator("li.contact").filter(has=ui.get_by_role("heading", name="Default"))
    # It should show the default contact's Telegram chat, and test it for real
    expect(default).to_contain_text(f"chat {CHAT}")
    default.get_by_role("button", name="Test").click()
    expect(ui.get_by_text("Test message sent.")).to_be_visible()
    assert "test message" in telegram.wait_for("sendMessage", 1)[0]["text"]

    ui.get_by_label("New contact").fill("ops")
    ui.get_by_role("button", name="Add contact").click()
    ops = ui.locator("li.contact").filter(has=ui.get_by_role("heading", name="ops"))
    ops.get_by_role("button", name="Add channel").click()
    dialog = ui.locator("#dialog")
    dialog.get_by_label("Type").select_option("Email")
    dialog.get_by_label("E-mail address").fill("not an address")
    dialog.get_by_role("button", name="Add channel").click()
    expect(dialog.locator("[data-error-for='configuration.address']")).to_have_text(
        "must be an e-mail address"
    )
    dialog.get_by_label("E-mail address").fill("ops@example.org")
    dialog.get_by_role("button", name="Add channel").click()
    expect(ops).to_contain_text("ops@example.org")
    shoot(ui, tmp_path, "contacts")

    ops.get_by_role("button", name="Disable").click()
    expect(ops.get_by_text("disabled")).to_be_visible()
    ops.locator("li.channel").get_by_role("button", name="Delete").click()
    ui.get_by_role("button", name="Delete channel").click()
    expect(ops.get_by_text("No channel yet")).to_be_visible()
    ops.get_by_role("button", name="Delete", exact=True).click()
    ui.get_by_role("button", name="Delete contact").click()
    expect(ui.locator("li.contact")).to_have_count(1)


def test_route_a_service_to_a_contact(ui: Page, mkat):
    service = mkat.api.create_service("web")
    ops = mkat.api.post("/api/v1/contacts", json={"name": "ops"}).json()
    visit(ui, f"#/services/{service['id']}")
    ui.get_by_role("button", name="change").click()
    ui.get_by_label("ops").check()
    ui.get_by_label("Default").uncheck()
    ui.get_by_role("button", name="Save").click()
    expect(ui.locator(".facts").first).to_contain_text("ops")
    assert mkat.api.service(service["id"])["contactIds"] == [ops["id"]]


# -- safe, small, everywhere -----------------------------------------------------------------------


def test_a_hostile_name_renders_as_text_everywhere(ui: Page, mkat):
    name = "<img src=x onerror=alert(1)>"
    service = mkat.api.create_service(name, description="<script>alert(2)</script>")
    requests.post(mkat.api.url(f"/webhook/{token_of(service)}/fail"), timeout=5)
    for route in ["#/", "#/services", f"#/services/{service['id']}", "#/alerts", "#/contacts"]:
        visit(ui, route)
        expect(ui.get_by_text(name).first).to_be_visible()
        # It should show the name as text: no element made from it, no script run (see `ui`)
        assert ui.locator("main img").count() == 0
        assert ui.locator("main script").count() == 0


@pytest.mark.parametrize(
    "route", ["#/", "#/services", "#/service", "#/services/new", "#/alerts", "#/contacts"]
)
def test_a_360px_phone_never_scrolls_sideways(ui: Page, mkat, route, tmp_path):
    service = mkat.api.create_service("a service with a rather long name to wrap " * 2)
    requests.post(mkat.api.url(f"/webhook/{token_of(service)}/fail"), timeout=5)
    ui.set_viewport_size({"width": 360, "height": 740})
    visit(ui, f"#/services/{service['id']}" if route == "#/service" else route)
    expect(ui.locator("main h1")).to_be_visible()
    width = ui.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1]
    shoot(ui, tmp_path, "phone" + route.replace("/", "_").replace("#", ""))


def test_the_whole_interface_weighs_under_100_kb():
    files = ["index.html", "app.js", "style.css"]
    assert sum((STATIC / name).stat().st_size for name in files) < 100 * 1024
    assert sorted(p.name for p in STATIC.iterdir()) == sorted(files)


def test_every_control_has_a_label(ui: Page, mkat):
    service = mkat.api.create_service("web")
    for route in ["#/services", "#/services/new", "#/alerts", "#/contacts", f"#/services/{service['id']}"]:
        visit(ui, route)
        expect(ui.locator("main h1")).to_be_visible()
        unlabelled = ui.evaluate(
            """[...document.querySelectorAll('main input, main select, main textarea')]
                 .filter((el) => !el.labels || el.labels.length === 0).map((el) => el.name)"""
        )
        assert unlabelled == []
