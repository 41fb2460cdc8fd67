"""The same checklist on every route: auth, 404, 405, bad JSON, 413, headers, hostile strings."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import requests

import mkat
from conftest import push, token_of

# method, path, a valid body (None: the route takes none). {service}, {monitor}, {alert}, {token}
# and {beat} are filled with real ids.
API_ROUTES = [
    ("GET", "/api/v1/services", None),
    ("POST", "/api/v1/services", {"name": "new", "monitors": [{"type": 0}]}),
    ("GET", "/api/v1/services/{service}", None),
    ("PUT", "/api/v1/services/{service}", {"description": "changed"}),
    ("DELETE", "/api/v1/services/{service}", None),
    ("POST", "/api/v1/services/{service}/pause", {}),
    ("POST", "/api/v1/services/{service}/resume", None),
    ("POST", "/api/v1/services/{service}/mute", {"durationMinutes": 15}),
    ("DELETE", "/api/v1/services/{service}/mute", None),
    ("POST", "/api/v1/services/{service}/monitors", {"type": 0}),
    ("PUT", "/api/v1/services/{service}/monitors/{monitor}", {"intervalSeconds": 120}),
    ("DELETE", "/api/v1/services/{service}/monitors/{monitor}", None),
    ("GET", "/api/v1/alerts", None),
    ("GET", "/api/v1/alerts/{alert}", None),
    ("POST", "/api/v1/alerts/{alert}/ack", None),
    ("GET", "/api/v1/services/{service}/contacts", None),
    ("PUT", "/api/v1/services/{service}/contacts", {"contactIds": ["{contact}"]}),
    ("GET", "/api/v1/contacts", None),
    ("POST", "/api/v1/contacts", {"name": "new contact"}),
    ("GET", "/api/v1/contacts/{contact}", None),
    ("PUT", "/api/v1/contacts/{contact}", {"name": "renamed"}),
    ("DELETE", "/api/v1/contacts/{contact}", None),
    (
        "POST",
        "/api/v1/contacts/{contact}/channels",
        {"type": "Webhook", "configuration": {"url": "http://127.0.0.1:9/"}},
    ),
    ("PUT", "/api/v1/contacts/{contact}/channels/{channel}", {"isEnabled": False}),
    ("DELETE", "/api/v1/contacts/{contact}/channels/{channel}", None),
    ("POST", "/api/v1/contacts/{contact}/channels/{channel}/test", None),
    ("GET", "/api/v1/channels", None),
    ("PUT", "/api/v1/channels/{channel}", {"isEnabled": False}),
    ("POST", "/api/v1/channels/{channel}/test", None),
]
# The event stream never ends by itself: it gets the checks that do not read a whole response.
STREAM_ROUTE = ("GET", "/api/v1/events/stream", None)
PUSH_ROUTES = [
    ("POST", "/webhook/{token}/fail", None),
    ("POST", "/webhook/{token}/recover", None),
    ("GET", "/heartbeat/{beat}", None),
    ("POST", "/heartbeat/{beat}", None),
]
OPEN_ROUTES = [*PUSH_ROUTES, ("GET", "/health", None), ("GET", "/health/ready", None), ("GET", "/", None)]
ALL_ROUTES = API_ROUTES + OPEN_ROUTES
GUARDED_ROUTES = [*API_ROUTES, STREAM_ROUTE]
BODY_ROUTES = [(m, p, b) for m, p, b in API_ROUTES if b is not None]
ID_ROUTES = [(m, p, b) for m, p, b in ALL_ROUTES if "{" in p]

NOT_FOUND_CODE = {
    "service": "SERVICE_NOT_FOUND",
    "monitor": "MONITOR_NOT_FOUND",
    "alert": "ALERT_NOT_FOUND",
    "token": "MONITOR_NOT_FOUND",
    "beat": "MONITOR_NOT_FOUND",
    "contact": "CONTACT_NOT_FOUND",
    "channel": "CHANNEL_NOT_FOUND",
}


def fill(body, ids):
    """The body with its {placeholders} replaced by real ids."""
    if isinstance(body, dict):
        return {key: fill(value, ids) for key, value in body.items()}
    if isinstance(body, list):
        return [fill(item, ids) for item in body]
    return body.format(**ids) if isinstance(body, str) else body


def route_id(route):
    return f"{route[0]} {route[1]}"


@pytest.fixture
def ids(api):
    """A service with a webhook and a heartbeat monitor, an alert, a contact with a channel."""
    service = api.create_service("web", [{"type": 0}, {"type": 1, "intervalSeconds": 60}])
    push(api, f"/webhook/{token_of(service)}/fail")
    contact = api.post("/api/v1/contacts", json={"name": "ops"}).json()
    channel = api.post(
        f"/api/v1/contacts/{contact['id']}/channels",
        json={"type": "Webhook", "configuration": {"url": "http://127.0.0.1:9/"}},
    ).json()
    return {
        "contact": contact["id"],
        "channel": channel["id"],
        "service": service["id"],
        "monitor": service["monitors"][0]["id"],
        "alert": api.alerts()[0]["id"],
        "token": token_of(service, 0),
        "beat": token_of(service, 1),
    }


def snapshot(api):
    """Everything a refused request must leave as it was."""
    services = api.get("/api/v1/services", params={"pageSize": 100}).json()["items"]
    return services, api.alerts(), api.get("/api/v1/contacts").json()


def call(api, method, path, ids, **kwargs):
    return requests.request(method, api.url(path.format(**ids)), timeout=10, **kwargs)


@pytest.mark.parametrize("route", GUARDED_ROUTES, ids=route_id)
def test_every_api_route_needs_credentials(api, ids, route):
    method, path, body = route
    body = fill(body, ids)
    before = snapshot(api)
    anonymous = call(api, method, path, ids, json=body)
    wrong = call(api, method, path, ids, json=body, auth=("admin", "wrong"))
    from_ui = call(api, method, path, ids, json=body, headers={"X-Requested-With": "mkat-ui"})
    # It should refuse with 401 in the error shape, asking browsers for Basic auth except the UI
    for response in (anonymous, wrong, from_ui):
        assert response.status_code == 401
        assert response.json() == {"error": "Authentication required", "code": "UNAUTHORIZED"}
    assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="mkat"'
    assert "WWW-Authenticate" not in from_ui.headers
    assert snapshot(api) == before


@pytest.mark.parametrize("route", API_ROUTES, ids=route_id)
def test_every_api_route_works_with_credentials(api, ids, route):
    method, path, body = route
    if path.endswith("/resume"):
        api.post(f"/api/v1/services/{ids['service']}/pause")
    response = api.request(method, path.format(**ids), json=fill(body, ids))
    assert response.status_code in (200, 201, 204), response.text


@pytest.mark.parametrize("route", ID_ROUTES, ids=route_id)
@pytest.mark.parametrize("bad_id", ["fresh-uuid", "not-a-uuid", "' OR 1=1 --"])
def test_every_route_answers_unknown_ids_with_404(api, ids, route, bad_id):
    method, path, body = route
    before = snapshot(api)
    for name in NOT_FOUND_CODE:
        if "{" + name + "}" not in path:
            continue
        unknown = str(uuid.uuid4()) if bad_id == "fresh-uuid" else bad_id
        if name in ("token", "beat") and bad_id == "fresh-uuid":
            unknown = uuid.uuid4().hex
        response = api.request(method, path.format(**{**ids, name: unknown}), json=fill(body, ids))
        # It should name what was not found, and change nothing
        assert response.status_code == 404, response.text
        assert response.json()["code"] in (NOT_FOUND_CODE[name], "NOT_FOUND")
    assert snapshot(api) == before


@pytest.mark.parametrize("route", [*ALL_ROUTES, STREAM_ROUTE], ids=route_id)
def test_every_route_refuses_other_methods_with_json_405(api, ids, route):
    method, path, _ = route
    response = api.request("PATCH", path.format(**ids))
    assert response.status_code == 405
    assert response.json() == {"error": "Method not allowed", "code": "METHOD_NOT_ALLOWED"}
    assert method in response.headers["Allow"]


@pytest.mark.parametrize("route", BODY_ROUTES, ids=route_id)
@pytest.mark.parametrize(
    "raw",
    [b'{"name": ', b"[1, 2]", b'"a string"', b"42", b"null", b"\xff\xfe", b'{"a": NaN}', b"[" * 100_00],
    ids=["truncated", "array", "string", "number", "null", "not-utf8", "nan", "deep"],
)
def test_every_body_route_refuses_malformed_json(api, ids, route, raw):
    method, path, _ = route
    before = snapshot(api)
    response = api.request(method, path.format(**ids), data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_JSON"
    assert snapshot(api) == before


@pytest.mark.parametrize("route", BODY_ROUTES, ids=route_id)
def test_every_body_route_refuses_wrong_types(api, ids, route):
    method, path, body = route
    before = snapshot(api)
    wrong = {key: {"nested": [value]} for key, value in body.items()} or {"until": ["tomorrow"]}
    response = api.request(method, path.format(**ids), json=wrong)
    assert response.status_code == 400
    assert response.json()["code"] == "VALIDATION_ERROR"
    # It should name the fields it was given (or a field inside one of them)
    named = {re.split(r"[.\[]", key)[0] for key in response.json()["details"]}
    assert named and named <= set(wrong)
    assert snapshot(api) == before


@pytest.mark.parametrize("route", [*ALL_ROUTES, STREAM_ROUTE], ids=route_id)
def test_every_route_refuses_bodies_over_64_kib(api, ids, route):
    method, path, _ = route
    before = snapshot(api)
    response = api.request(method, path.format(**ids), data=b"x" * (64 * 1024 + 1))
    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert snapshot(api) == before


def test_it_takes_a_body_of_exactly_64_kib(api):
    body = json.dumps({"name": "padded", "monitors": [{"type": 0}]}).encode()
    body = body[:-1] + b" " * (64 * 1024 - len(body)) + b"}"
    assert len(body) == 64 * 1024
    assert api.post("/api/v1/services", data=body).status_code == 201


def test_it_refuses_an_oversized_chunked_body(api):
    chunks = (b"x" * 1024 for _ in range(65))
    response = api.post("/api/v1/services", data=chunks)
    assert response.status_code == 413
    assert response.json()["code"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize("route", ALL_ROUTES, ids=route_id)
def test_every_response_carries_the_security_headers(api, ids, route):
    method, path, body = route
    for response in (
        api.request(method, path.format(**ids), json=fill(body, ids)),
        call(api, method, path, ids),
        api.request("PATCH", path.format(**ids)),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]


def test_unknown_paths_get_a_json_404(api):
    response = requests.get(api.url("/no/such/thing"), timeout=5)
    assert response.status_code == 404
    assert response.json() == {"error": "No such resource", "code": "NOT_FOUND"}


def test_an_unexpected_error_is_a_logged_json_500_with_a_request_id(api, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(mkat, "count_services", broken)
    response = api.get("/api/v1/services")
    request_id = response.headers["X-Request-Id"]
    # It should answer in the error shape, and log the traceback under the same request id
    assert response.status_code == 500
    assert response.json() == {"error": f"Internal error (request id {request_id})", "code": "INTERNAL_ERROR"}
    [logged] = [r for r in caplog.records if r.getMessage() == "request_failed"]
    assert logged.fields["request_id"] == request_id
    assert "a bug" in str(logged.exc_info[1])


# -- hostile strings ---------------------------------------------------------------------

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    "<script>alert('x')</script>",
    "Robert'); DROP TABLE services;--",
    '" OR ""="',
    "🚀 émoji ✓ 名前",
    "\u202eevil right-to-left",
    "%00%27 ${jndi:ldap://x} {{7*7}}",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_round_trip_as_plain_text(api, name):
    created = api.create_service(name, description=name)
    assert (created["name"], created["description"]) == (name.strip(), name.strip())
    # It should find it again by its name and keep every other table intact
    found = api.get("/api/v1/services", params={"search": name}).json()["items"]
    assert [s["id"] for s in found] == [created["id"]]
    muted = api.post(f"/api/v1/services/{created['id']}/mute", json={"durationMinutes": 5, "reason": name})
    assert muted.status_code == 200
    assert api.service(created["id"])["muteReason"] == name.strip()
    assert api.get("/api/v1/services").json()["totalCount"] == 1


@pytest.mark.parametrize("name", ["x" * 10_000, "\u0007bell", "\u0000nul", "a\rb"])
def test_hostile_names_that_cannot_be_kept_are_refused_without_change(api, name):
    existing = api.create_service("existing")
    response = api.post("/api/v1/services", json={"name": name, "monitors": [{"type": 0}]})
    renamed = api.put(f"/api/v1/services/{existing['id']}", json={"name": name})
    for refused in (response, renamed):
        assert refused.status_code == 400
        assert list(refused.json()["details"]) == ["name"]
    assert [s["name"] for s in api.get("/api/v1/services").json()["items"]] == ["existing"]


def test_hostile_query_strings_are_plain_data(api):
    api.create_service("web")
    for search in ["' OR 1=1 --", "%", "\\", "web' UNION SELECT * FROM settings --"]:
        response = api.get("/api/v1/services", params={"search": search})
        assert response.status_code == 200
        assert response.json()["items"] == []
