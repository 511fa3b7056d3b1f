"""`ansimi device run` refuses bad start-up input clearly; `ansimi device selftest` checks all."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from click.testing import CliRunner
from device_testkit import Keys, write_device_config

import device.cli
from ansimi.broker import Mosquitto, free_port
from ansimi.config import load_config
from ansimi_edge.cli import cli
from device.config import DeviceConfig


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_a_bad_config_stops_start_up_with_file_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[behaviour]\nlong_press_s = -3\n[mqtt]\nhost = "127.0.0.1"\nprot = 1883\n')
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert str(path) in output
    assert "`behaviour.long_press_s`" in output and "`mqtt.prot`" in output
    assert "Fix:" in output


def test_hold_times_out_of_order_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text("[behaviour]\ncancel_hold_s = 20\nduress_hold_s = 15\n")
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert "long_press_s < cancel_hold_s < duress_hold_s" in output


def test_a_missing_device_key_says_how_to_enrol(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text(f'[device]\nkey_file = "{tmp_path}/absent.key"\n')
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert f"no key at {tmp_path}/absent.key" in output
    assert "run `ansimi device enrol`" in output


def test_a_missing_gateway_key_names_the_key(tmp_path: Path, mosquitto: Mosquitto) -> None:
    path = write_device_config(tmp_path, mosquitto, Keys.new())
    path.write_text(path.read_text().replace("public_key = ", "# public_key = "))
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert "`gateway.public_key`" in output and "Fix:" in output


@pytest.fixture(autouse=True)
def ntp_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    # the outcome must not hang on whether this test machine's clock is NTP-synchronised
    monkeypatch.setattr(device.cli, "_ntp_synchronized", lambda: None)


def test_selftest_passes_on_a_healthy_device(tmp_path: Path, mosquitto: Mosquitto) -> None:
    extra = 'modem_port = "fake"\n'
    path = write_device_config(tmp_path, mosquitto, Keys.new(), extra=extra)
    path.write_text(path.read_text().replace('camera = "none"', 'camera = "synthetic"'))
    code, output = invoke("device", "selftest", "--config", str(path))
    assert code == 0, output
    for check in ("keys", "led", "buzzer", "buttons", "camera", "modem", "broker", "clock"):
        row = next(line for line in output.splitlines() if f" {check} " in line)
        assert "PASS" in row, row
    assert "FAIL" not in output


def test_selftest_fails_when_the_broker_is_unreachable(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = write_device_config(tmp_path, mosquitto, Keys.new())
    path.write_text(path.read_text().replace(f"port = {mosquitto.port}", f"port = {free_port()}"))
    code, output = invoke("device", "selftest", "--config", str(path))
    assert code == 1
    row = next(line for line in output.splitlines() if " broker " in line)
    assert "FAIL" in row
    camera = next(line for line in output.splitlines() if " camera " in line)
    assert "SKIP" in camera


def test_an_unwritable_state_dir_names_the_key_and_the_fix(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    path = write_device_config(tmp_path, mosquitto, Keys.new())
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    text = path.read_text().replace(f'state_dir = "{tmp_path}/device"', f'state_dir = "{blocker}"')
    path.write_text(text)
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert f"cannot open the outbox in {blocker}" in output
    assert "`device.state_dir`" in output


def test_a_second_agent_on_the_same_state_dir_is_told_what_to_do(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    from device.outbox import Outbox

    path = write_device_config(tmp_path, mosquitto, Keys.new())
    running = Outbox(tmp_path / "device" / "outbox.db")  # the first agent's hold on it
    try:
        code, output = invoke("device", "run", "--config", str(path))
    finally:
        running.close()
    assert code == 1
    assert "cannot open the outbox" in output and "another agent is running" in output


def test_a_bad_phone_number_is_refused_without_repeating_it(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text('[sms]\nnumbers = ["+821012345678", "010-9876-5432"]\n')
    code, output = invoke("device", "run", "--config", str(path))
    assert code == 1
    assert "`sms`" in output and "entry 2 of 2" in output and "Fix:" in output
    assert "9876" not in output and "12345678" not in output


def test_selftest_fails_on_an_outbox_readable_by_others(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # issue 19: the pending alerts are the household's business
    from device.outbox import Outbox

    path = write_device_config(tmp_path, mosquitto, Keys.new())
    outbox = tmp_path / "device" / "outbox.db"
    Outbox(outbox).close()
    outbox.chmod(0o644)
    code, output = invoke("device", "selftest", "--config", str(path))
    assert code == 1, output
    config = load_config(path, DeviceConfig)
    (keys,) = [c for c in asyncio.run(device.cli.run_selftest(config, path)) if c.name == "keys"]
    assert keys.outcome == "fail" and f"chmod 600 {outbox}" in keys.detail
