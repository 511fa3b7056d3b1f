"""The SMS numbers sealed in device.toml; `ansimi device wipe`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from ansimi.config import load_config
from device.cli import device
from device.config import DeviceConfig
from device.private import DevicePrivacyError, with_sms_numbers

NUMBERS = ["+821055512345", "+821066698765"]


def write_config(tmp_path: Path, device_id: str = "bell-0042") -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    path = tmp_path / f"{device_id}.toml"
    path.write_text(
        f'[device]\nid = "{device_id}"\nkey_file = "{state / "device.key"}"\n'
        f'data_key_file = "{state / "privacy.key"}"\nstate_dir = "{state}"\n'
        "[sms]\nafter_s = 5.0\n"
    )
    path.chmod(0o640)
    return path


def set_numbers(path: Path, numbers: list[str]) -> str:
    result = CliRunner().invoke(
        device, ["set-sms-numbers", "--config", str(path)], input="\n".join(numbers) + "\n"
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_numbers_are_sealed_in_the_raw_config_and_open_in_memory(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    output = set_numbers(path, NUMBERS)
    assert "2 number(s) sealed" in output
    raw = path.read_bytes()
    for number in NUMBERS:
        assert number.encode() not in raw and number[1:].encode() not in raw
        assert number not in output
    assert tomllib.loads(raw.decode())["sms"]["numbers"] == []
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    key_file = tmp_path / "state" / "privacy.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    config = load_config(path, DeviceConfig)
    assert config.sms.numbers == [] and config.sms.after_s == 5.0
    assert with_sms_numbers(config).sms.numbers == NUMBERS
    # a second run keeps the same key and replaces the numbers
    set_numbers(path, NUMBERS[:1])
    assert with_sms_numbers(load_config(path, DeviceConfig)).sms.numbers == NUMBERS[:1]


def test_a_bad_number_is_named_by_position_not_by_value(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = CliRunner().invoke(
        device, ["set-sms-numbers", "--config", str(path)], input="+821055512345\n010 5551 999\n"
    )
    assert result.exit_code != 0
    assert "number 2 of 2" in result.output and "5551" not in result.output
    assert "numbers_sealed" not in path.read_text()


def test_a_sealed_value_copied_from_another_bell_does_not_open(tmp_path: Path) -> None:
    other = write_config(tmp_path, "bell-0043")
    set_numbers(other, NUMBERS)
    sealed = load_config(other, DeviceConfig).sms.numbers_sealed
    mine = load_config(other, DeviceConfig).model_copy(deep=True)
    moved = mine.model_copy(update={"device": mine.device.model_copy(update={"id": "bell-0042"})})
    assert moved.sms.numbers_sealed == sealed
    with pytest.raises(DevicePrivacyError, match="set-sms-numbers"):
        with_sms_numbers(moved)


def test_a_missing_data_key_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    set_numbers(path, NUMBERS)
    (tmp_path / "state" / "privacy.key").unlink()
    with pytest.raises(DevicePrivacyError, match=r"privacy\.key.*set-sms-numbers"):
        with_sms_numbers(load_config(path, DeviceConfig))


def test_wipe_asks_first_then_removes_keys_config_and_outbox(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    set_numbers(path, NUMBERS)
    state = tmp_path / "state"
    for name in ("device.key", "outbox.db", "outbox.db-wal"):
        (state / name).write_bytes(b"x")
    kept = sorted(p.name for p in state.iterdir())
    refused = CliRunner().invoke(device, ["wipe", "--config", str(path)], input="n\n")
    assert refused.exit_code != 0 and "privacy.key" in refused.output
    assert sorted(p.name for p in state.iterdir()) == kept and path.exists()
    done = CliRunner().invoke(device, ["wipe", "--config", str(path), "--yes"])
    assert done.exit_code == 0, done.output
    assert list(state.iterdir()) == [] and not path.exists()
    assert "5 file(s) removed" in done.output
