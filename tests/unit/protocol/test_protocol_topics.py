from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import (
    DOWN_TYPES,
    GATEWAY_TYPES,
    MESSAGE_TYPES,
    PREFIX,
    UP_FILTER,
    UP_TYPES,
    Malformed,
    Topic,
    down_filter,
    down_topic,
    parse_topic,
    shared_up_filter,
    up_topic,
)

device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{2,63}", fullmatch=True)


def test_type_lists() -> None:
    assert set(UP_TYPES) | set(DOWN_TYPES) | set(GATEWAY_TYPES) == set(MESSAGE_TYPES)
    assert set(UP_TYPES) & set(DOWN_TYPES) == {"rtc"}
    assert not set(GATEWAY_TYPES) & (set(UP_TYPES) | set(DOWN_TYPES))


def test_topic_strings() -> None:
    assert PREFIX == "ansimi/v1"
    assert up_topic("bell-0001", "alert") == "ansimi/v1/bell-0001/up/alert"
    assert down_topic("bell-0001", "ack") == "ansimi/v1/bell-0001/down/ack"
    assert UP_FILTER == "ansimi/v1/+/up/#"
    assert shared_up_filter("gateways") == "$share/gateways/ansimi/v1/+/up/#"
    assert shared_up_filter("gw") == "$share/gw/ansimi/v1/+/up/#"
    assert down_filter("bell-0001") == "ansimi/v1/bell-0001/down/#"


@given(device_ids, st.sampled_from(UP_TYPES))
def test_up_round_trip(device_id: str, type_: str) -> None:
    assert parse_topic(up_topic(device_id, type_)) == Topic(device_id, "up", type_)


@given(device_ids, st.sampled_from(DOWN_TYPES))
def test_down_round_trip(device_id: str, type_: str) -> None:
    assert parse_topic(down_topic(device_id, type_)) == Topic(device_id, "down", type_)


def test_topic_is_frozen() -> None:
    topic = parse_topic("ansimi/v1/bell-0001/up/alert")
    with pytest.raises(dataclasses.FrozenInstanceError):
        topic.device_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "ansimi/v1",
        "ansimi/v1/bell-0001/up",
        "ansimi/v1/bell-0001/up/alert/extra",
        "ansimi/v1/bell-0001/up/alert/",
        "/ansimi/v1/bell-0001/up/alert",
        "ansimi/v2/bell-0001/up/alert",
        "other/v1/bell-0001/up/alert",
        "ansimi/v1/BELL-0001/up/alert",
        "ansimi/v1/-bell/up/alert",
        "ansimi/v1/b/up/alert",
        "ansimi/v1/+/up/alert",
        "ansimi/v1/bell-0001/up/#",
        "ansimi/v1/bell-0001/sideways/alert",
        "ansimi/v1/bell-0001/up/ack",  # acks only flow down
        "ansimi/v1/bell-0001/up/command",
        "ansimi/v1/bell-0001/down/alert",  # alerts only flow up
        "ansimi/v1/bell-0001/down/heartbeat",
        "ansimi/v1/bell-0001/up/alarm",
        "ansimi/v1/bell-0001/up/Alert",
        "ansimi/v1/bell-0001/up/alert\n",
        "ansimi/v1/bell-0001//alert",
    ],
)
def test_parse_topic_refuses(topic: str) -> None:
    with pytest.raises(Malformed):
        parse_topic(topic)


def test_parse_topic_message_is_short_for_long_input() -> None:
    with pytest.raises(Malformed) as info:
        parse_topic("ansimi/v1/" + "x" * 5000 + "/up/alert")
    assert len(str(info.value)) < 400


@given(st.text(max_size=100))
def test_parse_topic_raises_only_malformed(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except Malformed:
        return
    assert up_topic(parsed.device_id, parsed.type) == topic or (
        down_topic(parsed.device_id, parsed.type) == topic
    )


@pytest.mark.parametrize(
    ("build", "device_id", "type_"),
    [
        (up_topic, "Bell", "alert"),
        (up_topic, "bell-0001", "ack"),
        (up_topic, "bell-0001", "nope"),
        (down_topic, "bell-0001", "alert"),
        (down_topic, "bell/0001", "ack"),
        (down_topic, "+", "ack"),
    ],
)
def test_builders_refuse(build: object, device_id: str, type_: str) -> None:
    assert callable(build)
    with pytest.raises(Malformed):
        build(device_id, type_)


@pytest.mark.parametrize("device_id", ["+", "#", "a/b/c", "AB"])
def test_down_filter_refuses_wildcards(device_id: str) -> None:
    with pytest.raises(Malformed):
        down_filter(device_id)


@pytest.mark.parametrize("group", ["", "a/b", "g+", "g#", "x" * 65])
def test_shared_up_filter_refuses(group: str) -> None:
    with pytest.raises(Malformed):
        shared_up_filter(group)
