"""The remote config's wire part: bounded patches, layers, and one hash on both sides."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.messages import Command, Heartbeat
from protocol.remote_config import CONFIG_PATCH, config_hash, merge_layers

keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
values = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
patches = st.dictionaries(keys, st.dictionaries(keys, values, max_size=4), max_size=4)


def test_later_layers_win_key_by_key_and_empty_sections_go() -> None:
    defaults = {"mqtt": {"heartbeat_s": 30.0}, "behaviour": {"long_press_s": 3.0}}
    district = {"behaviour": {"long_press_s": 2.0, "ring_link_s": 60.0}}
    device = {"mqtt": {"heartbeat_s": 10.0}, "sms": {}}
    assert merge_layers([defaults, district, device]) == {
        "mqtt": {"heartbeat_s": 10.0},
        "behaviour": {"long_press_s": 2.0, "ring_link_s": 60.0},
    }


@given(patches)
def test_the_hash_survives_the_trip_through_a_signed_command(patch: dict) -> None:
    # the gateway hashes what it sends; the device hashes what it parsed: the same
    command = Command(name="set_config", config=patch)
    parsed = Command.model_validate_json(command.model_dump_json())
    assert parsed.config is not None
    assert config_hash(parsed.config) == config_hash(patch)


def test_the_hash_ignores_key_order_but_not_values() -> None:
    a = {"behaviour": {"long_press_s": 2.0, "ring_link_s": 60.0}, "mqtt": {"port": 8883}}
    b = {"mqtt": {"port": 8883}, "behaviour": {"ring_link_s": 60.0, "long_press_s": 2.0}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "mqtt": {"port": 8884}})
    assert config_hash({}) != config_hash({"mqtt": {}})


@pytest.mark.parametrize(
    "patch",
    [
        {"Behaviour": {"x": 1}},  # keys are lower-case names
        {"behaviour": {"x": {"nested": 1}}},  # two levels only
        {"behaviour": {"x": float("inf")}},
        {f"s{n}": {} for n in range(13)},  # bounded
    ],
)
def test_patches_outside_the_bounds_are_refused(patch: dict) -> None:
    with pytest.raises(ValidationError):
        CONFIG_PATCH.validate_python(patch)


def test_commands_and_heartbeats_without_config_keep_their_bytes() -> None:
    # agents and gateways that predate remote config sign and verify the same JSON
    assert Command(name="ping").model_dump_json() == '{"name":"ping","args":{}}'
    beat = Heartbeat(uptime_s=1, power="mains", firmware="f")
    assert "config_hash" not in beat.model_dump_json()
