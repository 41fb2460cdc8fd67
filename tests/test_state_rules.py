"""The state rules as pure functions, and the small parsers they rely on."""

import pytest

import mkat
from mkat import AlertType, State

DOWN, UP, UNKNOWN, PAUSED = State.DOWN, State.UP, State.UNKNOWN, State.PAUSED


@pytest.mark.parametrize(
    ("paused", "monitors", "expected"),
    [
        (False, [], UNKNOWN),
        (False, [UNKNOWN], UNKNOWN),
        (False, [UP], UP),
        (False, [UNKNOWN, UP], UP),
        (False, [UP, DOWN], DOWN),  # a passing monitor never masks a failing one
        (False, [DOWN, UNKNOWN], DOWN),
        (True, [DOWN], PAUSED),
        (True, [UP, UNKNOWN], PAUSED),
    ],
)
def test_it_derives_the_service_state_from_its_monitors(paused, monitors, expected):
    assert mkat.derive_state(paused, monitors) == expected


@pytest.mark.parametrize(
    ("old", "new", "missed", "expected"),
    [
        (UNKNOWN, DOWN, False, AlertType.FAILURE),
        (UP, DOWN, False, AlertType.FAILURE),
        (UP, DOWN, True, AlertType.MISSED_HEARTBEAT),
        (UNKNOWN, DOWN, True, AlertType.MISSED_HEARTBEAT),
        (DOWN, UP, False, AlertType.RECOVERY),
        (UNKNOWN, UP, False, None),  # a first success is not news
        (DOWN, UNKNOWN, False, None),
        (UP, PAUSED, False, None),
        (DOWN, PAUSED, False, None),
        (PAUSED, UNKNOWN, False, None),
        (UP, UNKNOWN, False, None),
    ],
)
def test_it_alerts_on_service_transitions_only(old, new, missed, expected):
    assert mkat.alert_type_for(old, new, missed) == expected


@pytest.mark.parametrize(
    ("interval", "minimum", "expected"),
    [(60, 0, 60), (3600, 0, 360), (86400, 60, 8640), (30, 120, 120)],
)
def test_it_defaults_grace_to_a_tenth_of_the_interval_but_at_least_a_minute(interval, minimum, expected):
    assert mkat.default_grace_seconds(interval, minimum) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, State.UP), ("down", State.DOWN), ("Paused", State.PAUSED), ("0", State.UNKNOWN)],
)
def test_it_accepts_enum_numbers_and_names(value, expected):
    assert State.parse(value) is expected


def test_it_accepts_enum_names_in_any_spelling():
    assert mkat.AlertType.parse("MissedHeartbeat") is AlertType.MISSED_HEARTBEAT
    assert mkat.AlertType.parse("missed_heartbeat") is AlertType.MISSED_HEARTBEAT
    assert mkat.MonitorType.parse("HEALTHCHECK") is mkat.MonitorType.HEALTH_CHECK


@pytest.mark.parametrize("value", [9, -1, True, "sideways", 1.0, None, "", [1]])
def test_it_refuses_unknown_enum_values(value):
    with pytest.raises(ValueError, match="must be one of"):
        State.parse(value)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0, "0s"), (45, "45s"), (300, "5m"), (5400, "1h 30m"), (90061, "1d 1h"), (-3, "0s")],
)
def test_it_formats_durations_for_people(seconds, expected):
    assert mkat.format_duration(seconds) == expected


def test_it_formats_instants_as_utc_iso_with_z():
    assert mkat.iso(0) == "1970-01-01T00:00:00.000Z"
    assert mkat.iso(None) is None
    assert mkat.parse_instant("1970-01-01T00:01:00Z") == 60
    assert mkat.parse_instant("1970-01-01T01:01:00+01:00") == 60
    assert mkat.parse_instant("1970-01-01T00:01:00") == 60  # no zone means UTC
