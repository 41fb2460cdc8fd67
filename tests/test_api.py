"""The API v1 over HTTP: services, monitors, pause/mute, alerts, URLs, health."""

from __future__ import annotations

import re

import pytest
import requests

import mkat
from conftest import PASSWORD, Api, make_config, push, start_server, token_of

HEARTBEAT = {"type": "Heartbeat", "intervalSeconds": 300}

# -- services ----------------------------------------------------------------------


def test_it_creates_a_service_with_its_monitors_and_the_default_contact(api):
    response = api.post(
        "/api/v1/services",
        json={
            "name": "Nightly backup",
            "description": "borg to the NAS",
            "severity": "High",
            "monitors": [HEARTBEAT, {"type": 0}],
        },
    )
    assert response.status_code == 201
    service = response.json()
    # It should answer with the whole service, in the API's names and enums
    assert service["name"] == "Nightly backup"
    assert service["description"] == "borg to the NAS"
    assert (service["severity"], service["state"]) == (2, 0)
    assert (service["pausedUntil"], service["autoResume"], service["mutedUntil"]) == (None, False, None)
    assert service["createdAt"] == mkat.iso(api.ctx.clock())
    assert len(service["contactIds"]) == 1
    beat, hook = service["monitors"]
    # It should make absolute push URLs only for the monitor's own type
    assert re.fullmatch(r"[0-9a-f]{32}", beat["token"])
    assert beat["heartbeatUrl"] == f"{api.base_url}/heartbeat/{beat['token']}"
    assert beat["webhookFailUrl"] is None
    assert (beat["intervalSeconds"], beat["gracePeriodSeconds"]) == (300, 60)
    assert beat["nextExpectedBefore"] == mkat.iso(api.ctx.clock() + 360)
    assert hook["webhookFailUrl"] == f"{api.base_url}/webhook/{hook['token']}/fail"
    assert hook["webhookRecoverUrl"] == f"{api.base_url}/webhook/{hook['token']}/recover"
    assert hook["heartbeatUrl"] is None and hook["metricUrl"] is None
    assert api.service(service["id"]) == service


def test_it_lists_services_by_name_whatever_the_case_with_pagination(api):
    for name in ["beta", "Alpha", "gamma", "Delta", "epsilon"]:
        api.create_service(name)
    page = api.get("/api/v1/services", params={"page": 2, "pageSize": 2}).json()
    assert [s["name"] for s in page["items"]] == ["Delta", "epsilon"]
    assert {k: v for k, v in page.items() if k != "items"} == {
        "page": 2,
        "pageSize": 2,
        "totalCount": 5,
        "totalPages": 3,
        "hasNextPage": True,
        "hasPreviousPage": True,
    }


@pytest.mark.parametrize(
    ("params", "page", "size"),
    [({"page": 0}, 1, 20), ({"page": -4}, 1, 20), ({"pageSize": 1000}, 1, 100), ({"pageSize": 0}, 1, 1)],
)
def test_it_clamps_page_numbers_and_sizes(api, params, page, size):
    body = api.get("/api/v1/services", params=params).json()
    assert (body["page"], body["pageSize"]) == (page, size)


def test_it_filters_services_by_state_and_search(api):
    up = api.create_service("web up")
    api.create_service("web 100% down")
    api.create_service("database")
    push(api, f"/webhook/{token_of(up)}/recover")
    # It should accept the state as a number or a name, and search names without case
    assert [s["name"] for s in api.get("/api/v1/services?state=1").json()["items"]] == ["web up"]
    assert [s["name"] for s in api.get("/api/v1/services?state=up").json()["items"]] == ["web up"]
    assert len(api.get("/api/v1/services", params={"search": "WEB"}).json()["items"]) == 2
    # It should take % and _ in a search literally
    assert [s["name"] for s in api.get("/api/v1/services", params={"search": "0%"}).json()["items"]] == [
        "web 100% down"
    ]
    assert api.get("/api/v1/services", params={"search": "_"}).json()["items"] == []


@pytest.mark.parametrize("query", ["state=9", "state=sideways", "page=abc", "pageSize=1.5"])
def test_it_refuses_query_parameters_it_cannot_parse(api, query):
    response = api.get(f"/api/v1/services?{query}")
    assert response.status_code == 400
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert query.split("=")[0] in response.json()["details"]


@pytest.mark.parametrize(("first", "second"), [("web", "WEB"), ("Straße", "STRASSE"), ("Ünïcode", "üNÏCODE")])
def test_it_keeps_names_unique_whatever_their_case(api, first, second):
    api.create_service(first)
    response = api.post("/api/v1/services", json={"name": second, "monitors": [{"type": 0}]})
    assert response.status_code == 409
    assert response.json()["code"] == "DUPLICATE_NAME"
    assert api.get("/api/v1/services").json()["totalCount"] == 1


def test_it_updates_only_the_fields_it_is_given(api):
    service = api.create_service("web", description="front", severity=3)
    response = api.put(f"/api/v1/services/{service['id']}", json={"description": "the front end"})
    assert response.status_code == 200
    updated = response.json()
    assert (updated["name"], updated["description"], updated["severity"]) == ("web", "the front end", 3)
    # It should clear an optional field given as null, and refuse null for a required one
    cleared = api.put(f"/api/v1/services/{service['id']}", json={"description": None}).json()
    assert cleared["description"] is None
    refused = api.put(f"/api/v1/services/{service['id']}", json={"name": None})
    assert refused.status_code == 400
    assert refused.json()["details"] == {"name": ["must not be null"]}


def test_it_lets_a_service_change_the_case_of_its_own_name_but_not_take_another(api):
    web = api.create_service("web")
    api.create_service("db")
    assert api.put(f"/api/v1/services/{web['id']}", json={"name": "WEB"}).json()["name"] == "WEB"
    taken = api.put(f"/api/v1/services/{web['id']}", json={"name": "DB"})
    assert taken.status_code == 409
    assert api.service(web["id"])["name"] == "WEB"


def test_it_deletes_a_service_with_its_monitors_and_alerts(api):
    service = api.create_service("web")
    push(api, f"/webhook/{token_of(service)}/fail")
    assert api.delete(f"/api/v1/services/{service['id']}").status_code == 204
    # It should forget the service, its alerts, and its push tokens
    assert api.get(f"/api/v1/services/{service['id']}").status_code == 404
    assert api.alerts() == []
    assert push(api, f"/webhook/{token_of(service)}/fail").status_code == 404


@pytest.mark.parametrize(
    ("monitor", "field", "message"),
    [
        ({"type": "Heartbeat"}, "monitors[0].intervalSeconds", "is required"),
        ({"type": "Heartbeat", "intervalSeconds": 0}, "monitors[0].intervalSeconds", "must be between 1"),
        ({"type": "Heartbeat", "intervalSeconds": 604801}, "monitors[0].intervalSeconds", "must be between"),
        ({"type": "Heartbeat", "intervalSeconds": "60"}, "monitors[0].intervalSeconds", "whole number"),
        ({"type": "Heartbeat", "intervalSeconds": 60.5}, "monitors[0].intervalSeconds", "whole number"),
        ({"type": "Heartbeat", "intervalSeconds": True}, "monitors[0].intervalSeconds", "whole number"),
        (
            {"type": 1, "intervalSeconds": 60, "gracePeriodSeconds": -1},
            "monitors[0].gracePeriodSeconds",
            "between",
        ),
        ({"type": "HealthCheck"}, "monitors[0].type", "not available yet"),
        ({"type": 7}, "monitors[0].type", "must be one of"),
        ({}, "monitors[0].type", "is required"),
    ],
)
def test_it_says_which_monitor_field_is_wrong(api, monitor, field, message):
    response = api.post("/api/v1/services", json={"name": "web", "monitors": [monitor]})
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert message in body["details"][field][0]
    assert api.get("/api/v1/services").json()["totalCount"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"monitors": [{"type": 0}]}, "name"),
        ({"name": "", "monitors": [{"type": 0}]}, "name"),
        ({"name": "   ", "monitors": [{"type": 0}]}, "name"),
        ({"name": "x" * 101, "monitors": [{"type": 0}]}, "name"),
        ({"name": "a\u0000b", "monitors": [{"type": 0}]}, "name"),
        ({"name": ["web"], "monitors": [{"type": 0}]}, "name"),
        ({"name": "web", "description": "d" * 501, "monitors": [{"type": 0}]}, "description"),
        ({"name": "web", "severity": 4, "monitors": [{"type": 0}]}, "severity"),
        ({"name": "web"}, "monitors"),
        ({"name": "web", "monitors": []}, "monitors"),
        ({"name": "web", "monitors": {"type": 0}}, "monitors"),
        ({"name": "web", "monitors": ["webhook"]}, "monitors[0]"),
    ],
)
def test_it_refuses_a_bad_service_and_names_the_field(api, body, field):
    response = api.post("/api/v1/services", json=body)
    assert response.status_code == 400
    assert field in response.json()["details"]


def test_it_refuses_text_that_is_not_valid_unicode(api):
    raw = b'{"name": "bad \\ud800 surrogate", "monitors": [{"type": 0}]}'
    response = api.post("/api/v1/services", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["details"] == {"name": ["must be valid Unicode text"]}


def test_it_keeps_newlines_in_descriptions_but_not_in_names(api):
    service = api.create_service("web", description="line one\nline two")
    assert service["description"] == "line one\nline two"
    response = api.post("/api/v1/services", json={"name": "two\nlines", "monitors": [{"type": 0}]})
    assert response.json()["details"] == {"name": ["must not contain control characters"]}


# -- monitors ---------------------------------------------------------------------


def test_it_adds_updates_and_deletes_monitors(api):
    service = api.create_service("web")
    added = api.post(f"/api/v1/services/{service['id']}/monitors", json=HEARTBEAT)
    assert added.status_code == 201
    monitor = added.json()
    assert (monitor["type"], monitor["serviceId"], monitor["intervalSeconds"]) == (1, service["id"], 300)

    changed = api.put(
        f"/api/v1/services/{service['id']}/monitors/{monitor['id']}", json={"intervalSeconds": 600}
    )
    assert changed.status_code == 200
    # It should keep the fields it was not given, and the token
    assert (changed.json()["intervalSeconds"], changed.json()["gracePeriodSeconds"]) == (600, 60)
    assert changed.json()["token"] == monitor["token"]
    assert changed.json()["nextExpectedBefore"] == mkat.iso(api.ctx.clock() + 660)

    deleted = api.delete(f"/api/v1/services/{service['id']}/monitors/{monitor['id']}")
    assert deleted.status_code == 204
    assert len(api.service(service["id"])["monitors"]) == 1


def test_it_caps_a_service_at_100_monitors(api):
    too_many = api.post("/api/v1/services", json={"name": "big", "monitors": [{"type": 0}] * 101})
    assert too_many.json()["details"] == {"monitors": ["must have at most 100 monitors"]}
    service = api.create_service("big", [{"type": 0}] * 100)
    one_more = api.post(f"/api/v1/services/{service['id']}/monitors", json={"type": 0})
    assert (one_more.status_code, one_more.json()["details"]) == (
        400,
        {"monitors": ["a service has at most 100 monitors"]},
    )
    assert len(api.service(service["id"])["monitors"]) == 100


def test_it_refuses_to_change_a_monitor_type(api):
    service = api.create_service("web")
    monitor = service["monitors"][0]
    response = api.put(
        f"/api/v1/services/{service['id']}/monitors/{monitor['id']}", json={"type": "Heartbeat"}
    )
    assert response.status_code == 400
    assert "type" in response.json()["details"]
    assert api.service(service["id"])["monitors"][0]["type"] == 0


def test_it_refuses_to_delete_the_last_monitor(api):
    service = api.create_service("web")
    response = api.delete(f"/api/v1/services/{service['id']}/monitors/{service['monitors'][0]['id']}")
    assert (response.status_code, response.json()["code"]) == (400, "LAST_MONITOR")


def test_it_does_not_reach_a_monitor_through_another_service(api):
    web, db = api.create_service("web"), api.create_service("db")
    path = f"/api/v1/services/{web['id']}/monitors/{db['monitors'][0]['id']}"
    assert api.put(path, json={"intervalSeconds": 60}).json()["code"] == "MONITOR_NOT_FOUND"
    assert api.delete(path).json()["code"] == "MONITOR_NOT_FOUND"


# -- pause, resume, mute ---------------------------------------------------------------


def test_it_pauses_and_resumes_over_http(api):
    service = api.create_service("web")
    until = mkat.iso(api.ctx.clock() + 3600)
    paused = api.post(f"/api/v1/services/{service['id']}/pause", json={"until": until, "autoResume": True})
    assert paused.json() == {"paused": True, "until": until}
    shown = api.service(service["id"])
    assert (shown["state"], shown["pausedUntil"], shown["autoResume"]) == (3, until, True)
    # It should take an empty body as "pause until resumed"
    assert api.post(f"/api/v1/services/{service['id']}/pause").json() == {"paused": True, "until": None}

    assert api.post(f"/api/v1/services/{service['id']}/resume").json() == {"resumed": True}
    shown = api.service(service["id"])
    assert (shown["state"], shown["pausedUntil"], shown["autoResume"]) == (0, None, False)
    again = api.post(f"/api/v1/services/{service['id']}/resume")
    assert (again.status_code, again.json()["code"]) == (400, "SERVICE_NOT_PAUSED")


@pytest.mark.parametrize(
    "body",
    [{"until": "yesterday"}, {"until": 1234}, {"until": "2000-01-01T00:00:00Z"}, {"autoResume": "yes"}],
)
def test_it_refuses_a_bad_pause(api, body):
    service = api.create_service("web")
    response = api.post(f"/api/v1/services/{service['id']}/pause", json=body)
    assert response.status_code == 400
    assert response.json()["code"] == "VALIDATION_ERROR"
    assert api.service(service["id"])["state"] == 0


def test_it_mutes_and_unmutes_over_http(api):
    service = api.create_service("web")
    muted = api.post(
        f"/api/v1/services/{service['id']}/mute", json={"durationMinutes": 60, "reason": "deploy"}
    )
    until = mkat.iso(api.ctx.clock() + 3600)
    assert muted.json() == {"muted": True, "until": until}
    assert (api.service(service["id"])["mutedUntil"], api.service(service["id"])["muteReason"]) == (
        until,
        "deploy",
    )
    # It should record alerts while muted as suppressed
    push(api, f"/webhook/{token_of(service)}/fail")
    [alert] = api.alerts()
    assert (alert["suppressed"], alert["suppressionReason"]) == (True, "muted")

    assert api.delete(f"/api/v1/services/{service['id']}/mute").status_code == 204
    assert api.service(service["id"])["mutedUntil"] is None


@pytest.mark.parametrize("minutes", [0, 43201, "15", 1.5, None])
def test_it_refuses_a_bad_mute_duration(api, minutes):
    service = api.create_service("web")
    response = api.post(f"/api/v1/services/{service['id']}/mute", json={"durationMinutes": minutes})
    assert response.status_code == 400
    assert "durationMinutes" in response.json()["details"]


# -- alerts ---------------------------------------------------------------------------


def test_it_lists_alerts_newest_first_with_filters(api, clock):
    web, db = api.create_service("web"), api.create_service("db")
    push(api, f"/webhook/{token_of(web)}/fail")
    clock.advance(1)
    push(api, f"/webhook/{token_of(db)}/fail")
    clock.advance(1)
    push(api, f"/webhook/{token_of(web)}/recover")
    assert [(a["serviceName"], a["type"]) for a in api.alerts()] == [("web", 1), ("db", 0), ("web", 0)]
    # It should filter by service, type (number or name), acknowledgement and suppression
    assert [a["type"] for a in api.alerts(serviceId=web["id"])] == [1, 0]
    assert [a["serviceName"] for a in api.alerts(type="Failure")] == ["db", "web"]
    first = api.alerts()[2]
    api.post(f"/api/v1/alerts/{first['id']}/ack")
    assert [a["id"] for a in api.alerts(acknowledged="true")] == [first["id"]]
    assert len(api.alerts(acknowledged="false")) == 2
    assert api.alerts(suppressed="true") == []


@pytest.mark.parametrize("query", ["serviceId=42", "type=Exploded", "acknowledged=maybe", "suppressed=2"])
def test_it_refuses_alert_filters_it_cannot_parse(api, query):
    response = api.get(f"/api/v1/alerts?{query}")
    assert (response.status_code, response.json()["code"]) == (400, "VALIDATION_ERROR")


def test_it_gets_and_acknowledges_an_alert(api):
    service = api.create_service("web")
    push(api, f"/webhook/{token_of(service)}/fail")
    [alert] = api.alerts()
    assert api.get(f"/api/v1/alerts/{alert['id']}").json() == alert
    assert alert["message"] == "Webhook reported a failure"
    assert api.post(f"/api/v1/alerts/{alert['id']}/ack").json() == {"acknowledged": True}
    assert api.get(f"/api/v1/alerts/{alert['id']}").json()["acknowledgedAt"] == mkat.iso(api.ctx.clock())
    again = api.post(f"/api/v1/alerts/{alert['id']}/ack")
    assert (again.status_code, again.json()["code"]) == (400, "ALREADY_ACKNOWLEDGED")


# -- URLs, base path, health --------------------------------------------------------------


@pytest.fixture
def configured_api(tmp_path, clock):
    """Start mkat with extra configuration; stops them all at the end."""
    running = []

    def start(**overrides):
        folder = tmp_path / str(len(running))
        folder.mkdir()
        ctx = mkat.Context(make_config(folder, **overrides), clock)
        base_url, thread = start_server(ctx)
        running.append((ctx, thread))
        return Api(base_url, ctx)

    yield start
    for ctx, thread in running:
        ctx.stop.set()
        thread.join(timeout=5)
        ctx.db.close()


def test_it_builds_push_urls_from_the_public_url(configured_api):
    api = configured_api(public_url="https://mon.example.org/mkat")
    hook = api.create_service("web")["monitors"][0]
    assert hook["webhookFailUrl"] == f"https://mon.example.org/mkat/webhook/{hook['token']}/fail"


def test_it_honours_forwarded_headers_only_when_trusting_the_proxy(configured_api):
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "mon.example.org"}
    trusting = configured_api(trust_proxy=True)
    service = trusting.post("/api/v1/services", json={"name": "a", "monitors": [HEARTBEAT]}, headers=headers)
    assert service.json()["monitors"][0]["heartbeatUrl"].startswith("https://mon.example.org/heartbeat/")
    wary = configured_api()
    service = wary.post("/api/v1/services", json={"name": "a", "monitors": [HEARTBEAT]}, headers=headers)
    assert service.json()["monitors"][0]["heartbeatUrl"].startswith(wary.base_url + "/heartbeat/")


def test_it_serves_everything_under_the_base_path(configured_api):
    root = configured_api(base_path="/mkat")
    api = Api(root.base_url + "/mkat", root.ctx)
    service = api.create_service("web")
    # It should build URLs with the prefix, answer pushes under it, and nothing outside it
    assert service["monitors"][0]["webhookFailUrl"] == f"{api.base_url}/webhook/{token_of(service)}/fail"
    assert push(api, f"/webhook/{token_of(service)}/fail").status_code == 200
    assert root.get("/api/v1/services").status_code == 404
    assert root.get("/api/v1/services").json()["code"] == "NOT_FOUND"
    assert api.get("/").status_code == 200
    redirect = root.get("/mkat", allow_redirects=False)
    assert (redirect.status_code, redirect.headers["Location"]) == (301, "/mkat/")
    # It should answer health checks at the root too, for container health checks
    assert root.get("/health").json()["status"] == "healthy"
    assert api.get("/health/ready").json()["status"] == "ready"


def test_it_reports_health_and_readiness(api):
    assert api.get("/health").json() == {"status": "healthy", "timestamp": mkat.iso(api.ctx.clock())}
    assert requests.get(api.url("/health/ready"), timeout=5).json()["status"] == "ready"


def test_it_reports_unready_when_the_database_fails(api):
    def broken(*args):
        raise mkat.sqlite3.OperationalError("disk I/O error")

    api.ctx.db.read = broken
    response = requests.get(api.url("/health/ready"), timeout=5)
    assert (response.status_code, response.json()["status"]) == (503, "unavailable")


def test_it_serves_the_ui_without_credentials(api):
    page = requests.get(api.url("/"), timeout=5)
    assert page.status_code == 200
    assert "text/html" in page.headers["Content-Type"]
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "<script>" not in page.text
    assert requests.get(api.url("/static/style.css"), timeout=5).status_code == 200
    missing = requests.get(api.url("/static/../mkat.py"), timeout=5)
    assert missing.status_code == 404
    assert PASSWORD not in missing.text
