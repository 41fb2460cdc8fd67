"""The contacts, channels and routing API: who gets told, and how."""

from __future__ import annotations

import pytest

import mkat

TELEGRAM = {"type": "Telegram", "configuration": {"chatId": "-1001234567890", "messageThreadId": 7}}
EMAIL = {"type": "Email", "configuration": {"address": "ops@example.org"}}
WEBHOOK = {"type": "Webhook", "configuration": {"url": "https://hooks.example.org/mkat?key=abc"}}


def default_contact(api):
    return next(c for c in api.get("/api/v1/contacts").json() if c["isDefault"])


def new_contact(api, name="ops"):
    response = api.post("/api/v1/contacts", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


def new_channel(api, contact_id, body):
    response = api.post(f"/api/v1/contacts/{contact_id}/channels", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def test_a_fresh_instance_has_a_default_contact_that_new_services_get(api):
    [default] = api.get("/api/v1/contacts").json()
    assert {k: default[k] for k in ("name", "isDefault", "channels", "serviceCount")} == {
        "name": "Default",
        "isDefault": True,
        "channels": [],
        "serviceCount": 0,
    }
    service = api.create_service("web")
    assert service["contactIds"] == [default["id"]]
    assert default_contact(api)["serviceCount"] == 1


def test_the_telegram_chat_setting_gives_the_default_contact_a_channel_once(start_mkat):
    first = start_mkat()
    [channel] = default_contact(first.api)["channels"]
    assert (channel["type"], channel["configuration"], channel["isEnabled"]) == (0, {"chatId": "4242"}, True)
    first.stop()
    second = start_mkat()
    # It should not add it again at the next start
    assert len(default_contact(second.api)["channels"]) == 1


def test_it_creates_contacts_with_channels_of_every_type(api, clock):
    contact = new_contact(api, "ops team")
    assert (contact["name"], contact["isDefault"], contact["channels"]) == ("ops team", False, [])
    created = [new_channel(api, contact["id"], body) for body in (TELEGRAM, EMAIL, WEBHOOK)]
    # It should answer each channel whole, configuration as an object
    assert created[0] == {
        "id": created[0]["id"],
        "contactId": contact["id"],
        "type": 0,
        "configuration": {"chatId": "-1001234567890", "messageThreadId": 7},
        "isEnabled": True,
        "createdAt": mkat.iso(clock()),
        "lastError": None,
        "lastErrorAt": None,
    }
    assert [c["configuration"] for c in created[1:]] == [EMAIL["configuration"], WEBHOOK["configuration"]]
    shown = api.get(f"/api/v1/contacts/{contact['id']}").json()
    assert shown["channels"] == created
    assert api.get("/api/v1/channels").json() == created


def test_it_accepts_a_configuration_as_a_json_string_and_omits_what_was_not_given(api):
    contact = new_contact(api)
    channel = new_channel(api, contact["id"], {"type": 0, "configuration": '{"chatId": 42}'})
    assert channel["configuration"] == {"chatId": "42"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "Telegram", "configuration": {}}, "configuration.chatId"),
        ({"type": "Telegram", "configuration": {"chatId": "not a chat"}}, "configuration.chatId"),
        ({"type": "Telegram", "configuration": {"chatId": True}}, "configuration.chatId"),
        ({"type": 0, "configuration": {"chatId": 1, "messageThreadId": 0}}, "configuration.messageThreadId"),
        ({"type": "Email", "configuration": {"address": "not-an-address"}}, "configuration.address"),
        ({"type": "Email", "configuration": {"address": "a@b"}}, "configuration.address"),
        ({"type": "Webhook", "configuration": {"url": "ftp://example.org"}}, "configuration.url"),
        ({"type": "Webhook", "configuration": {"url": "javascript:alert(1)"}}, "configuration.url"),
        ({"type": "Webhook", "configuration": "not json"}, "configuration"),
        ({"type": "Webhook", "configuration": [1]}, "configuration"),
        ({"type": "Pigeon", "configuration": {}}, "type"),
        ({"configuration": {"url": "https://x.org"}}, "type"),
        ({"type": 2, "configuration": {"url": "https://x.org"}, "isEnabled": "yes"}, "isEnabled"),
    ],
)
def test_it_refuses_a_bad_channel_and_names_the_field(api, body, field):
    contact = new_contact(api)
    response = api.post(f"/api/v1/contacts/{contact['id']}/channels", json=body)
    assert response.status_code == 400
    assert field in response.json()["details"]
    assert api.get("/api/v1/channels").json() == []


def test_it_updates_a_channel_through_either_route(api):
    contact = new_contact(api)
    channel = new_channel(api, contact["id"], EMAIL)
    changed = api.put(
        f"/api/v1/contacts/{contact['id']}/channels/{channel['id']}",
        json={"configuration": {"address": "oncall@example.org"}},
    ).json()
    assert (changed["configuration"], changed["isEnabled"]) == ({"address": "oncall@example.org"}, True)
    disabled = api.put(f"/api/v1/channels/{channel['id']}", json={"isEnabled": False}).json()
    assert (disabled["configuration"], disabled["isEnabled"]) == ({"address": "oncall@example.org"}, False)
    # It should refuse to change the type, and check the configuration against the channel's type
    assert api.put(f"/api/v1/channels/{channel['id']}", json={"type": "Webhook"}).status_code == 400
    wrong = api.put(f"/api/v1/channels/{channel['id']}", json={"configuration": {"url": "https://x.org"}})
    assert wrong.json()["details"] == {"configuration.address": ["is required"]}


def test_a_channel_is_only_reached_through_its_own_contact(api):
    ops, dev = new_contact(api, "ops"), new_contact(api, "dev")
    channel = new_channel(api, ops["id"], EMAIL)
    wrong = f"/api/v1/contacts/{dev['id']}/channels/{channel['id']}"
    assert api.put(wrong, json={"isEnabled": False}).json()["code"] == "CHANNEL_NOT_FOUND"
    assert api.delete(wrong).json()["code"] == "CHANNEL_NOT_FOUND"
    assert api.post(wrong + "/test").json()["code"] == "CHANNEL_NOT_FOUND"
    assert api.delete(f"/api/v1/contacts/{ops['id']}/channels/{channel['id']}").status_code == 204
    assert api.get("/api/v1/channels").json() == []


def test_it_renames_contacts_and_keeps_names_unique(api):
    ops = new_contact(api, "ops")
    new_contact(api, "dev")
    assert api.put(f"/api/v1/contacts/{ops['id']}", json={"name": "Ops"}).json()["name"] == "Ops"
    taken = api.put(f"/api/v1/contacts/{ops['id']}", json={"name": "DEV"})
    assert (taken.status_code, taken.json()["code"]) == (409, "DUPLICATE_NAME")
    assert api.post("/api/v1/contacts", json={"name": "default"}).status_code == 409


def test_it_routes_a_service_to_the_contacts_it_is_given(api):
    ops, dev = new_contact(api, "ops"), new_contact(api, "dev")
    service = api.create_service("web")
    response = api.put(
        f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [dev["id"], ops["id"]]}
    )
    assert response.json() == {"assigned": 2}
    # It should list them by name, and count the service on each
    contacts = api.get(f"/api/v1/services/{service['id']}/contacts").json()
    assert [c["name"] for c in contacts] == ["dev", "ops"]
    assert sorted(api.service(service["id"])["contactIds"]) == sorted([dev["id"], ops["id"]])
    assert default_contact(api)["serviceCount"] == 0


@pytest.mark.parametrize(
    "body",
    [{"contactIds": []}, {"contactIds": ["not-a-uuid"]}, {"contactIds": "x"}, {}, {"contactIds": [None]}],
)
def test_it_never_leaves_a_service_without_a_contact(api, body):
    service = api.create_service("web")
    response = api.put(f"/api/v1/services/{service['id']}/contacts", json=body)
    assert (response.status_code, response.json()["code"]) == (400, "VALIDATION_ERROR")
    assert len(api.service(service["id"])["contactIds"]) == 1


def test_it_refuses_contacts_that_do_not_exist(api):
    service = api.create_service("web")
    ghost = "00000000-0000-4000-8000-000000000000"
    response = api.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ghost]})
    assert response.json()["details"] == {"contactIds": [f"no such contact: {ghost}"]}
    assert api.service(service["id"])["contactIds"] == [default_contact(api)["id"]]


def test_it_never_deletes_the_default_contact_or_a_services_only_contact(api):
    default = default_contact(api)
    refused = api.delete(f"/api/v1/contacts/{default['id']}")
    assert (refused.status_code, refused.json()["code"]) == (400, "DEFAULT_CONTACT")
    ops = new_contact(api, "ops")
    service = api.create_service("web")
    api.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ops["id"]]})
    refused = api.delete(f"/api/v1/contacts/{ops['id']}")
    assert (refused.status_code, refused.json()["code"]) == (400, "LAST_CONTACT")
    # It should allow it once the service has another contact
    api.put(f"/api/v1/services/{service['id']}/contacts", json={"contactIds": [ops["id"], default["id"]]})
    assert api.delete(f"/api/v1/contacts/{ops['id']}").status_code == 204
    assert api.service(service["id"])["contactIds"] == [default["id"]]


def test_deleting_a_contact_deletes_its_channels(api):
    ops = new_contact(api, "ops")
    new_channel(api, ops["id"], WEBHOOK)
    api.delete(f"/api/v1/contacts/{ops['id']}")
    assert api.get("/api/v1/channels").json() == []
    assert api.get(f"/api/v1/contacts/{ops['id']}").json()["code"] == "CONTACT_NOT_FOUND"


def test_testing_a_channel_without_telegram_configured_says_so(api):
    ops = new_contact(api, "ops")
    channel = new_channel(api, ops["id"], TELEGRAM)
    result = api.post(f"/api/v1/channels/{channel['id']}/test").json()
    assert result == {"success": False, "message": "Telegram is not configured: set MKAT_TELEGRAM_BOT_TOKEN"}
