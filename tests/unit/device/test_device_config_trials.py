"""The device's remote config file: failures counted per config, kept across restarts; SMS
numbers the gateway sealed for the device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device.config import DeviceConfig
from device.remote_config import (
    MAX_FAILURES,
    STATE_FILE,
    ConfigFailedBefore,
    ConfigRefused,
    RemoteConfig,
)
from protocol.keys import generate_key
from protocol.remote_config import config_hash, without_sealed_numbers
from protocol.sealed_numbers import seal_numbers

FAST = {"behaviour": {"ring_link_s": 5.0}}
SLOW = {"behaviour": {"ring_link_s": 90.0}}


def remote(tmp_path: Path, key: Ed25519PrivateKey | None = None) -> RemoteConfig:
    config = DeviceConfig.model_validate({"device": {"id": "bell-0001", "state_dir": tmp_path}})
    return RemoteConfig(config, durable=False, device_key=key)


def test_a_config_is_refused_after_failing_twice_in_a_row(tmp_path: Path) -> None:
    r = remote(tmp_path)
    for failure in range(1, MAX_FAILURES + 1):
        r.begin(FAST, now_ms=0, connects=0)
        r.rollback()
        assert (r.failed, r.failures) == (config_hash(FAST), failure)
    assert r.blocked(config_hash(FAST))
    with pytest.raises(ConfigFailedBefore):
        r.begin(FAST, now_ms=0, connects=0)
    # another config proven: the broken one may be tried again when sent
    r.begin(SLOW, now_ms=0, connects=0)
    r.commit()
    assert (r.failed, r.failures) == (None, 0)
    r.begin(FAST, now_ms=0, connects=0)


def test_a_restart_during_a_trial_counts_as_a_failure_of_that_config(tmp_path: Path) -> None:
    r = remote(tmp_path)
    r.begin(FAST, now_ms=0, connects=0)
    again = remote(tmp_path)  # the agent stopped during the trial
    assert again.abandoned == FAST and again.patch == {}
    assert (again.failed, again.failures) == (config_hash(FAST), 1)
    again.begin(FAST, now_ms=0, connects=0)  # one more try
    third = remote(tmp_path)
    assert third.blocked(config_hash(FAST))


def test_a_file_from_before_counting_gives_its_failed_config_one_more_try(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"good": SLOW, "trial": None, "failed": config_hash(FAST)})
    )
    r = remote(tmp_path)
    assert r.good == SLOW and (r.failed, r.failures) == (config_hash(FAST), 1)
    assert not r.blocked(config_hash(FAST))


NUMBERS = ["+821012345678", "0212345678"]


def test_numbers_the_gateway_sealed_for_this_device_open_in_memory_only(tmp_path: Path) -> None:
    key = generate_key()
    r = remote(tmp_path, key)
    patch = {"sms": {"numbers_from_gateway": seal_numbers(NUMBERS, key.public_key())}}
    assert r.begin(patch, now_ms=0, connects=0).sms.numbers == NUMBERS
    assert all(n not in (tmp_path / STATE_FILE).read_text() for n in NUMBERS)
    r.commit()
    assert remote(tmp_path, key).effective().sms.numbers == NUMBERS


def test_numbers_sealed_for_another_device_are_refused(tmp_path: Path) -> None:
    key = generate_key()
    other = {"sms": {"numbers_from_gateway": seal_numbers(NUMBERS, generate_key().public_key())}}
    with pytest.raises(ConfigRefused, match="not sealed for this device's key"):
        remote(tmp_path, key).begin(other, now_ms=0, connects=0)
    with pytest.raises(ConfigRefused, match="no device key here"):
        remote(tmp_path).begin(other, now_ms=0, connects=0)


def test_after_a_key_rotation_the_rest_of_the_config_runs_without_the_sealed_numbers(
    tmp_path: Path,
) -> None:
    # `ansimi provision device rotate`: the agent starts again with a new key, and the
    # numbers its last good config carries were sealed to the old one
    old, new = generate_key(), generate_key()
    sealed = seal_numbers(NUMBERS, old.public_key())
    good = {"device": {"silent": True}, "sms": {"after_s": 20.0, "numbers_from_gateway": sealed}}
    before = remote(tmp_path, old)
    before.begin(good, now_ms=0, connects=0)
    before.commit()
    assert before.effective().sms.numbers == NUMBERS
    rotated = remote(tmp_path, new)
    # silent mode and the timings stay: only the numbers it cannot open are left out, so
    # the SMS fallback uses device.toml's own (none here)
    assert rotated.good == {"device": {"silent": True}, "sms": {"after_s": 20.0}}
    config = rotated.effective()
    assert config.device.silent and config.sms.after_s == 20.0 and config.sms.numbers == []
    # the hash the gateway wants once it sees the new key (gateway/remote_config.py)
    assert rotated.hash == config_hash(without_sealed_numbers(good))
    # a config that holds nothing but those numbers leaves nothing behind, not `[sms]`
    (tmp_path / "only").mkdir()
    only = remote(tmp_path / "only", old)
    only.begin({"sms": {"numbers_from_gateway": sealed}}, now_ms=0, connects=0)
    only.commit()
    assert remote(tmp_path / "only", new).good == {}
