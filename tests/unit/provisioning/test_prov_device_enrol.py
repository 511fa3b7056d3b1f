"""`ansimi device enrol` and `ansimi provision device` without a gateway: what is decided
before any request, the config it writes, the ssh command line, and the exit codes."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import tomllib
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ansimi.broker import free_port
from ansimi_edge.cli import cli
from device.config import DeviceConfig
from device.enrol import (
    EnrolError,
    Paths,
    check_clock,
    enrol,
    render_config,
    split_label_url,
)
from provisioning.devices import enrol_url
from siteca.remote import ssh_command
from siteca.site import init_site

NOW = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)


def test_the_written_config_has_every_field_and_reads_back_the_same() -> None:
    config = DeviceConfig.model_validate(
        {
            "device": {"id": "doorbell-0001", "kind": "doorbell", "silent": True},
            "gateway": {"id": "gw-site", "public_key": "A" * 43},
            "mqtt": {"host": "gw.example", "ca_file": "/var/lib/ansimi/device/ca.crt"},
            "sms": {"numbers": ["+821000000000"]},
            "video": {"ice_servers": [{"urls": ["turn:turn.example:3478"], "username": "d"}]},
        }
    )
    text = render_config(config)
    assert DeviceConfig.model_validate(tomllib.loads(text)) == config
    # every section and every key is there, unset ones as comments
    for section, values in config.model_dump().items():
        assert f"[{section}]" in text
        for key in values:
            forms = (f"{key} =", f"# {key} (unset)", f"[[{section}.{key}]]")
            assert any(form in text for form in forms), key


def test_clock_checks_use_the_gateways_date_header() -> None:
    header = {"Date": "Tue, 24 Nov 2026 12:00:00 GMT"}
    check_clock(header, NOW + dt.timedelta(seconds=119), 120)
    check_clock({}, NOW + dt.timedelta(days=3), 120)  # no header: nothing to compare
    with pytest.raises(EnrolError, match="300 s behind the gateway's") as caught:
        check_clock(header, NOW - dt.timedelta(seconds=300), 120)
    assert caught.value.exit_code == 1 and "timedatectl" in str(caught.value)


def test_refusals_before_any_request(tmp_path: Path) -> None:
    paths = Paths(tmp_path, tmp_path, tmp_path / "device.toml")
    with pytest.raises(EnrolError, match="https://") as caught:
        enrol("http://gw:8443", "bell-0001.abc", paths)
    assert caught.value.exit_code == 2
    with pytest.raises(EnrolError, match="not an enrolment token"):
        enrol("https://gw:8443", "abc", paths)
    (tmp_path / "device.key").write_text("old key")
    # the unreachable gateway is never asked: the existing key stops it first
    with pytest.raises(EnrolError, match="--force"):
        enrol(f"https://127.0.0.1:{free_port()}", "bell-0001.abc", paths)
    assert (tmp_path / "device.key").read_text() == "old key"


def test_an_unreachable_gateway_exits_4_and_writes_nothing(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "d", tmp_path / "d", tmp_path / "d" / "device.toml")
    with pytest.raises(EnrolError, match="cannot reach the gateway") as caught:
        enrol(f"https://127.0.0.1:{free_port()}", "bell-0001.abc", paths)
    assert caught.value.exit_code == 4
    assert not (tmp_path / "d").exists()


def test_the_enrol_command_turns_the_domain_error_into_its_exit_code(tmp_path: Path) -> None:
    # the domain error is no click exception: the command converts it at its edge
    assert not isinstance(EnrolError("x"), click.ClickException)
    gateway = f"https://127.0.0.1:{free_port()}"
    args = ["--gateway", gateway, "--token", "bell-0001.abc", "--state-dir", str(tmp_path)]
    result = CliRunner().invoke(
        cli, ["device", "enrol", *args, "--config-out", str(tmp_path / "device.toml")]
    )
    assert result.exit_code == 4, result.output
    assert "cannot reach the gateway" in result.output
    assert not isinstance(result.exception, EnrolError)


def test_the_first_spelling_still_runs_the_command_but_is_not_listed() -> None:
    listed = CliRunner().invoke(cli, ["device", "--help"])
    assert "enrol " in listed.output and "enroll" not in listed.output
    old = CliRunner().invoke(cli, ["device", "enroll", "--help"])
    assert old.exit_code == 0 and "--gateway" in old.output


def test_the_ssh_command_quotes_for_the_remote_shell_and_carries_no_secret() -> None:
    argv = ssh_command(
        "pi@bell.local",
        "https://gw:8443/a b",
        config_out=Path("/etc/ansimi/device.toml"),
        state_dir=Path("/var/lib/ansimi/my device"),
        with_ca=True,
        force=True,
    )
    assert argv[:6] == ["ssh", "-o", "BatchMode=yes", "-T", "pi@bell.local", "--"]
    remote = shlex.split(argv[6])
    assert remote[:3] == ["ansimi", "device", "enroll"]
    assert remote[remote.index("--gateway") + 1] == "https://gw:8443/a b"
    assert remote[remote.index("--state-dir") + 1] == "/var/lib/ansimi/my device"
    assert remote[remote.index("--token") + 1] == "-"
    assert remote[remote.index("--ca-file") + 1] == "-"
    assert "--force" in remote


def _provision(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["provision", "device", *args], env=env)
    return result.exit_code, result.output


def test_provision_errors_exit_with_their_codes(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    no_token = {"ANSIMI_ADMIN_TOKEN": "", "ANSIMI_ADMIN_TOKEN_FILE": ""}
    code, out = _provision("list", "--gateway", url, "--json", env=no_token)
    assert code == 1 and "admin token" in json.loads(out)["error"]

    token = {"ANSIMI_ADMIN_TOKEN": "t" * 32}
    code, out = _provision("list", "--gateway", url, "--json", env=token)
    assert code == 4 and "cannot reach the gateway" in json.loads(out)["error"]

    # an unknown district is refused before the gateway is asked anything
    code, out = _provision(
        "add", "--type", "bell", "--district", "yongsam", "--gateway", url, "--json", env=token
    )
    assert code == 1 and 'did you mean "yongsan"' in json.loads(out)["error"]

    code, out = _provision(
        "add", "--type", "bell", "--district", "mapo", "--id", "Bell 1", "--gateway", url,
        "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "device id" in json.loads(out)["error"]

    code, out = _provision(
        "add", "--type", "bell", "--district", "mapo", "--gateway", url, "--ca-file",
        str(tmp_path / "nowhere.crt"), "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "no CA certificate" in json.loads(out)["error"]

    code, out = _provision(
        "revoke", "bell-0001", "--dir", str(tmp_path / "nosite"), "--gateway", url,
        "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "no site" in json.loads(out)["error"]
    code, out = _provision(
        "list", "--gateway", url, "--ca-file", __file__, "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "no PEM CA certificate" in json.loads(out)["error"]

    code, out = _provision("list", env=token)
    assert code == 2 and "--gateway" in out


def test_a_label_that_cannot_be_written_stops_add_before_the_gateway(tmp_path: Path) -> None:
    init_site(tmp_path / "site", site="unit", port=18883)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "bell-0001.png").write_bytes(b"an earlier label")
    token = {"ANSIMI_ADMIN_TOKEN": "t" * 32}
    common = ["--gateway", f"https://127.0.0.1:{free_port()}", "--dir", str(tmp_path / "site")]
    code, out = _provision(
        "add", "--type", "bell", "--district", "mapo", "--id", "bell-0001",
        "--qr-dir", str(tmp_path / "labels"), *common, "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "--force-label" in json.loads(out)["error"]
    code, out = _provision(
        "add", "--type", "bell", "--district", "mapo", "--qr-dir", str(tmp_path / "missing"),
        *common, "--json", env=token,
    )  # fmt: skip
    assert code == 1 and "not a directory" in json.loads(out)["error"]


def test_the_label_url_gives_the_gateway_and_the_token() -> None:
    url = enrol_url("https://gw.example:8443/", "bell-0001.secret-part")
    assert url == "https://gw.example:8443/enrol#token=bell-0001.secret-part"
    assert split_label_url(url) == ("https://gw.example:8443", "bell-0001.secret-part")
    assert split_label_url("https://gw.example:8443") == ("https://gw.example:8443", None)


class FakeAdmin:
    """The gateway's admin API as `add_device` uses it, recording what it was asked."""

    base_url = "https://gw.example:8443"
    ca_file = None

    def __init__(self) -> None:
        self.created: list[str] = []
        self.cancelled: list[str] = []

    def create_enrolment(
        self, device_id: str, *args: object, **kwargs: object
    ) -> dict[str, object]:
        self.created.append(device_id)
        return {"token": f"{device_id}.secret", "expires_ms": 1}

    def cancel_enrolments(self, device_id: str) -> int:
        self.cancelled.append(device_id)
        return 1


def test_add_cancels_the_token_when_the_label_cannot_be_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provisioning import devices

    admin = FakeAdmin()
    added = devices.add_device(
        admin,  # type: ignore[arg-type]
        "bell", "mapo", "", device_id="bell-0001", qr_dir=tmp_path,
    )  # fmt: skip
    assert added.qr_png.read_bytes()[:4] == b"\x89PNG" and added.qr_png.stat().st_mode & 0o077 == 0

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(devices.segno, "make", broken)
    with pytest.raises(OSError, match="No space"):
        devices.add_device(
            admin,  # type: ignore[arg-type]
            "bell", "mapo", "", device_id="bell-0002", qr_dir=tmp_path,
        )  # fmt: skip
    assert admin.created == ["bell-0001", "bell-0002"] and admin.cancelled == ["bell-0002"]
    assert not list(tmp_path.glob("bell-0002*"))


def test_the_driver_follows_the_board_and_each_kind_gets_the_pins_it_needs(
    tmp_path: Path,
) -> None:
    from device.enrol import board_model, hardware_for
    from device.hal.config import HardwareConfig

    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert board_model(model) == "Raspberry Pi 4 Model B Rev 1.4"
    assert board_model(tmp_path / "absent") == ""
    on_pi, warning = hardware_for("doorbell", board_model(model))
    assert warning is None and on_pi["driver"] == "gpiozero"
    assert HardwareConfig.model_validate(on_pi).doorbell_pin is not None
    on_pc, warning = hardware_for("bell", "")
    assert on_pc["driver"] == "fake" and warning is not None and "Raspberry Pi" in warning
    assert HardwareConfig.model_validate(on_pc).emergency_pin is not None


def test_an_offline_key_with_a_relative_state_dir_is_refused_naming_the_device_path(
    tmp_path: Path,
) -> None:
    # device.toml would name paths relative to wherever the agent happens to start
    result = CliRunner().invoke(
        cli,
        ["device", "enrol", "--gateway", "https://127.0.0.1:1", "--token", "bell-0001.abc",
         "--state-dir", "state", "--write-key-to", str(tmp_path / "sd")],
    )  # fmt: skip
    assert result.exit_code == 2 and "--state-dir state is relative" in result.output
    assert "/var/lib/ansimi/device" in result.output and not (tmp_path / "sd").exists()


def test_test_press_asks_the_gateway_and_says_when_it_cannot() -> None:
    url = f"https://127.0.0.1:{free_port()}"
    token = {"ANSIMI_ADMIN_TOKEN": "t" * 32}
    code, out = _provision("test-press", "bell-0001", "--gateway", url, "--json", env=token)
    assert code == 4 and "cannot reach the gateway" in json.loads(out)["error"]
