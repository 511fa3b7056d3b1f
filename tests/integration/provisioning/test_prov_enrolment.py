"""Enrolment end to end: a real site CA, a real mosquitto with TLS, the real gateway serving
its API (with the enrolment routes it adds itself, running from the site) over HTTPS, and
the real `ansimi` commands as subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from ansimi_testkit import eventually, nowhere_centre

from ansimi.broker import Mosquitto, free_port
from ansimi.config import load_config
from ansimi.privacy import create_key_file
from device.agent import Agent
from device.config import DeviceConfig
from device.enrol import EnrolError, Paths, enrol
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.observer import AgentObserver
from gateway.config import (
    ApiConfig,
    ApiToken,
    EnrolConfig,
    GatewayConfig,
    MqttConfig,
    PrivacyConfig,
)
from gateway.service import Gateway
from gateway.store import Incoming
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import load_private_key, public_key_from_b64
from siteca import pki
from siteca.site import Site, init_site

ADMIN = "admin-token-for-tests-0123456789"
OPERATOR = "mapo-desk-token-for-tests-012345"
ANSIMI = str(Path(sys.executable).with_name("ansimi"))


@dataclass
class Rig:
    site: Site
    broker: Mosquitto
    gateway: Gateway
    url: str
    tmp: Path
    pid_file: Path

    async def ansimi(
        self, *args: str, stdin: str = "", extra_path: Path | None = None, cwd: Path | None = None
    ) -> tuple[int, str, str]:
        env = {**os.environ, "ANSIMI_ADMIN_TOKEN": ADMIN}
        if extra_path is not None:
            env["PATH"] = f"{extra_path}:{env['PATH']}"
        proc = await asyncio.create_subprocess_exec(
            ANSIMI,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def add(self, device_id: str, *extra: str) -> dict[str, object]:
        qr = self.tmp / "labels"
        qr.mkdir(exist_ok=True)
        code, out, err = await self.ansimi(
            "provision", "device", "add", "--type", "bell", "--district", "mapo",
            "--label", "test bell", "--id", device_id, "--gateway", self.url,
            "--dir", str(self.site.layout.root), "--qr-dir", str(qr), "--json", *extra,
        )  # fmt: skip
        assert code == 0, out + err
        added: dict[str, object] = json.loads(out)
        return added

    async def enrol(self, token: str, where: Path, *extra: str) -> tuple[int, str, str]:
        return await self.ansimi(
            "device", "enrol", "--gateway", self.url, "--token", token,
            "--ca-file", str(self.site.layout.ca_cert), "--state-dir", str(where),
            "--config-out", str(where / "device.toml"), *extra,
        )  # fmt: skip


@pytest.fixture
async def rig(site: Site, broker: Mosquitto, tmp_path: Path) -> AsyncIterator[Rig]:
    lay = site.layout
    database = tmp_path / "gateway" / "gateway.db"
    config = GatewayConfig(
        centres=[nowhere_centre()],
        id=site.gateway_id,
        signing_key=lay.gateway_key,
        database=database,
        enrol=EnrolConfig(site_dir=lay.root),
        mqtt=MqttConfig(
            host=broker.host,
            port=broker.port,
            ca_file=lay.gateway_ca,
            cert_file=lay.gateway_cert,
            key_file=lay.gateway_tls_key,
        ),
        api=ApiConfig(
            enabled=True,
            port=free_port(),
            # the broker's certificate names localhost and 127.0.0.1, as this server needs
            cert_file=lay.broker.cert_file,
            key_file=lay.broker.key_file,
            tokens=[
                ApiToken(name="installer", role="admin", token=ADMIN),
                ApiToken(name="mapo-desk", role="operator", districts=["mapo"], token=OPERATOR),
            ],
        ),
        privacy=PrivacyConfig(key_file=tmp_path / "privacy.key"),
    )
    create_key_file(config.privacy.key_file)
    gateway = Gateway(config)
    # running from the site directory, the gateway serves enrolment by itself
    assert gateway.enrolment is not None
    assert broker.process is not None
    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{broker.process.pid}\n")
    task = asyncio.create_task(gateway.run())
    try:
        await asyncio.wait_for(gateway.ready.wait(), 10)
        await eventually(lambda: gateway.api.port is not None)
        url = f"https://127.0.0.1:{gateway.api.port}"
        yield Rig(site, broker, gateway, url, tmp_path, pid_file)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def agent_from(
    config_path: Path,
    observer: AgentObserver | None = None,
    clock_ms: Callable[[], int] | None = None,
) -> AsyncIterator[Agent]:
    """The real agent, configured only by what `ansimi device enrol` wrote."""
    config = load_config(config_path, DeviceConfig)
    agent = Agent(
        config,
        signer=Signer(config.device.id, load_private_key(config.device.key_file)),
        gateway_key=public_key_from_b64(config.gateway.public_key),
        hardware=Hardware(FakeInputs(), FakeIndicator(), camera=None, modem=None),
        observer=observer,
        clock_ms=clock_ms,
    )
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class LinkDowns(AgentObserver):
    """How often the agent lost its link to the broker."""

    def __init__(self) -> None:
        self.count = 0

    def link_down(self) -> None:
        self.count += 1


def alerts_of(database: Path, device_id: str) -> int:
    with sqlite3.connect(database) as db:
        (count,) = db.execute(
            "SELECT COUNT(*) FROM events WHERE device_id = ? AND type = 'alert'", (device_id,)
        ).fetchone()
    return int(count)


def press(agent: Agent) -> None:
    inputs = agent.hardware.inputs
    assert isinstance(inputs, FakeInputs)
    inputs.press("emergency")
    inputs.release("emergency")


async def test_an_enrolled_device_connects_publishes_and_the_gateway_receives_it(
    rig: Rig,
) -> None:
    added = await rig.add("bell-0001")
    assert Path(str(added["qr_png"])).read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in Path(str(added["qr_svg"])).read_bytes()
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 0, out + err
    assert (device_dir / "device.key").stat().st_mode & 0o777 == 0o600

    config = load_config(device_dir / "device.toml", DeviceConfig)
    assert config.device.id == "bell-0001" and config.gateway.id == rig.site.gateway_id
    assert (config.mqtt.host, config.mqtt.port) == (rig.broker.host, rig.broker.port)

    database = rig.gateway.config.database
    async with agent_from(device_dir / "device.toml") as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        press(agent)
        await eventually(lambda: alerts_of(database, "bell-0001") == 1)
        # the gateway's signed `received` ack, checked by the device with the key it was given
        await eventually(lambda: agent.outbox.depth() == 0)

        code, out, err = await rig.ansimi(
            "provision", "device", "check", "bell-0001", "--gateway", rig.url,
            "--dir", str(rig.site.layout.root), "--device-config",
            str(device_dir / "device.toml"), "--json",
        )  # fmt: skip
        report = json.loads(out)
        results = {c["name"]: c["ok"] for c in report["checks"]}
        assert code == 0, report
        assert results["connect as the device"] and results["device key"]
        assert results["broker TLS"] and results["certificate at the site CA"]

    code, out, _ = await rig.ansimi(
        "provision", "device", "list", "--gateway", rig.url,
        "--dir", str(rig.site.layout.root), "--json",
    )  # fmt: skip
    assert code == 0
    (listed,) = json.loads(out)["devices"]
    assert (listed["id"], listed["state"], listed["district"]) == ("bell-0001", "enrolled", "mapo")


async def test_an_expired_token_is_refused_and_nothing_is_written(rig: Rig) -> None:
    added = await rig.add("bell-0002", "--ttl-hours", "1")
    # an hour later: the record's expiry is in the past
    with sqlite3.connect(rig.gateway.config.database) as db:
        db.execute(
            "UPDATE enrolments SET expires_ms = ? WHERE device_id = 'bell-0002'",
            (wall_ms() - 1000,),
        )
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 3, out + err
    assert "expired" in err and "ansimi provision device add" in err
    assert not (device_dir / "device.key").exists()
    assert not (device_dir / "device.toml").exists()


async def test_a_used_token_cannot_be_used_again(rig: Rig) -> None:
    added = await rig.add("bell-0003")
    first = rig.tmp / "first"
    # the QR label's URL alone is enough: it carries the gateway and the token
    code, out, err = await rig.ansimi(
        "device", "enrol", "--gateway", str(added["url"]),
        "--ca-file", str(rig.site.layout.ca_cert), "--state-dir", str(first),
        "--config-out", str(first / "device.toml"),
    )  # fmt: skip
    assert code == 0, out + err
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "second")
    assert code == 3 and "used already" in err
    assert "ansimi provision device rotate DEVICE_ID" in err  # how to get a new one
    assert not (rig.tmp / "second" / "device.key").exists()
    # and the first device's key is the one the gateway holds
    device = rig.gateway.store.database.device("bell-0003")
    assert device is not None


async def test_duplicate_ids_unknown_districts_and_a_missing_ca_are_explained(rig: Rig) -> None:
    await rig.add("bell-0004")
    code, out, err = await rig.ansimi(
        "provision", "device", "add", "--type", "bell", "--district", "mapo", "--id",
        "bell-0004", "--gateway", rig.url, "--dir", str(rig.site.layout.root),
        "--qr-dir", str(rig.tmp / "labels"), "--force-label",
    )  # fmt: skip
    assert code == 3 and "bell-0004" in err and "choose another --id" in err
    code, out, err = await rig.ansimi(
        "provision", "device", "add", "--type", "store", "--district", "gangnum",
        "--gateway", rig.url, "--dir", str(rig.site.layout.root),
    )  # fmt: skip
    assert code == 1 and 'did you mean "gangnam"' in err
    # for people: the token, the label files and the command for the device (never wrapped:
    # an installer copies them)
    code, out, err = await rig.ansimi(
        "provision", "device", "add", "--type", "doorbell", "--district", "jongno",
        "--id", "doorbell-0001", "--label", "door", "--gateway", rig.url,
        "--dir", str(rig.site.layout.root), "--qr-dir", str(rig.tmp / "labels"),
    )  # fmt: skip
    assert code == 0, out + err
    assert "Registered doorbell-0001 (doorbell, jongno)" in out
    assert "doorbell-0001." in out and "doorbell-0001.png" in out
    assert f"ansimi device enrol --gateway {rig.url}" in out
    # the device without the site CA cannot trust the gateway: it says what to pass
    added = await rig.add("bell-0005")
    code, out, err = await rig.ansimi(
        "device", "enrol", "--gateway", rig.url, "--token", str(added["token"]),
        "--state-dir", str(rig.tmp / "d5"), "--config-out", str(rig.tmp / "d5" / "device.toml"),
    )  # fmt: skip
    assert code == 4 and "--ca-file" in err
    # nothing was used up: with the CA it works
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "d5")
    assert code == 0, out + err


async def test_a_device_clock_too_far_off_is_refused_before_the_token_is_spent(
    rig: Rig,
) -> None:
    added = await rig.add("bell-0006")
    where = rig.tmp / "d6"
    paths = Paths(where, where, where / "device.toml")
    ca = rig.site.layout.ca_cert.read_text()
    # the Date header has whole seconds: 600 s ahead reads as 600 or 601
    late = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=10)
    with pytest.raises(EnrolError, match=r"60[01] s ahead of the gateway"):
        await asyncio.to_thread(
            enrol, rig.url, str(added["token"]), paths, ca_pem=ca, now=lambda: late
        )
    assert not where.exists()
    result = await asyncio.to_thread(enrol, rig.url, str(added["token"]), paths, ca_pem=ca)
    assert result.device_id == "bell-0006"


async def test_an_existing_key_is_kept_without_force(rig: Rig) -> None:
    where = rig.tmp / "d7"
    code, out, err = await rig.enrol(str((await rig.add("bell-0007"))["token"]), where)
    assert code == 0, out + err
    key_before = (where / "device.key").read_bytes()
    second = await rig.add("bell-0008")
    code, out, err = await rig.enrol(str(second["token"]), where)
    assert code == 1 and "--force" in err
    assert (where / "device.key").read_bytes() == key_before


def fake_ssh(where: Path) -> tuple[Path, Path]:
    """A fake `ssh` on PATH: records its arguments, then runs the remote command here, with
    its stdin passed on. Returns (its directory, the record file)."""
    bin_dir = where / "bin"
    bin_dir.mkdir()
    record = where / "ssh-argv"
    (bin_dir / "ssh").write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}\n'
        'for last in "$@"; do :; done\n'
        'exec sh -c "$last"\n'
    )
    (bin_dir / "ssh").chmod(0o755)
    return bin_dir, record


async def test_enrol_over_ssh_sends_the_token_on_stdin(rig: Rig) -> None:
    bin_dir, record = fake_ssh(rig.tmp)
    added = await rig.add("bell-0009")
    token = str(added["token"])
    where = rig.tmp / "remote"
    code, out, err = await rig.ansimi(
        "device", "enrol", "--ssh", "pi@bell-0009.local", "--gateway", rig.url,
        "--token", token, "--ca-file", str(rig.site.layout.ca_cert),
        "--state-dir", str(where), "--config-out", str(where / "device.toml"),
        "--remote-ansimi", ANSIMI,
        extra_path=bin_dir,
    )  # fmt: skip
    assert code == 0, out + err
    argv = record.read_text().splitlines()
    assert argv[:5] == ["-o", "BatchMode=yes", "-T", "pi@bell-0009.local", "--"]
    assert "device enroll" in argv[5] and "--token -" in argv[5]
    assert token not in record.read_text()
    assert load_config(where / "device.toml", DeviceConfig).device.id == "bell-0009"


async def test_offline_key_for_an_sd_card_warns_and_points_to_the_device_paths(
    rig: Rig,
) -> None:
    added = await rig.add("bell-0010")
    card = rig.tmp / "card"
    code, out, err = await rig.ansimi(
        "device", "enrol", "--gateway", rig.url, "--token", str(added["token"]),
        "--ca-file", str(rig.site.layout.ca_cert), "--write-key-to", str(card),
    )  # fmt: skip
    assert code == 0, out + err
    assert "WARNING" in err and "not on the device" in err
    assert (card / "device.key").stat().st_mode & 0o777 == 0o600
    config = load_config(card / "device.toml", DeviceConfig)
    assert config.device.key_file == Path("/var/lib/ansimi/device/device.key")
    assert config.mqtt.cert_file == Path("/var/lib/ansimi/device/device.crt")


async def test_provision_device_revoke_cuts_the_device_off_within_10s(rig: Rig) -> None:
    added = await rig.add("bell-0011")
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 0, out + err
    database = rig.gateway.config.database
    async with agent_from(device_dir / "device.toml") as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        press(agent)
        await eventually(lambda: alerts_of(database, "bell-0011") == 1)

        loop = asyncio.get_running_loop()
        start = loop.time()
        code, out, err = await rig.ansimi(
            "provision", "device", "revoke", "bell-0011", "--dir", str(rig.site.layout.root),
            "--gateway", rig.url, "--pid-file", str(rig.pid_file), "--json",
        )  # fmt: skip
        report = json.loads(out)
        assert code == 0, report
        assert report["revoked_at_gateway"] and report["broker_reloaded"]
        assert report["kicked"] == ["bell-0011"]
        await eventually(lambda: not agent.link.connected, 10.0)
        assert loop.time() - start < 10.0

        # it keeps trying, and is refused by the broker (the CRL) every time
        press(agent)
        refused = agent.link.session.failed_connects
        await eventually(lambda: agent.link.session.failed_connects >= refused + 2, 10.0)
        assert not agent.link.connected
        assert alerts_of(database, "bell-0011") == 1
        device = rig.gateway.store.database.device("bell-0011")
        assert device is not None and device.revoked

    code, out, err = await rig.ansimi(
        "provision", "device", "check", "bell-0011", "--dir", str(rig.site.layout.root),
        "--gateway", rig.url, "--device-config", str(device_dir / "device.toml"),
    )  # fmt: skip
    assert code == 5, out + err
    assert "REVOKED" in out and "0 valid of 1 issued" in out
    code, out, err = await rig.ansimi(
        "provision", "device", "list", "--dir", str(rig.site.layout.root), "--gateway", rig.url
    )
    assert code == 0 and "bell-0011" in out and "revoked" in out


async def test_rotation_makes_a_new_key_on_the_device_and_then_revokes_the_old_cert(
    rig: Rig,
) -> None:
    added = await rig.add("bell-0012")
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 0, out + err
    old_key = (device_dir / "device.key").read_bytes()
    (old_cert,) = [c for c in rig.site.issued() if pki.common_name(c) == "bell-0012"]
    database = rig.gateway.config.database
    bin_dir, _ = fake_ssh(rig.tmp)
    async with agent_from(device_dir / "device.toml") as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        rotate = asyncio.create_task(
            rig.ansimi(
                "provision",
                "device",
                "rotate",
                "bell-0012",
                "--dir",
                str(rig.site.layout.root),
                "--gateway",
                rig.url,
                "--ssh",
                "pi@bell-0012.local",
                "--remote-ansimi",
                ANSIMI,
                "--restart-command",
                "",
                "--device-config-out",
                str(device_dir / "device.toml"),
                "--device-state-dir",
                str(device_dir),
                "--pid-file",
                str(rig.pid_file),
                "--wait",
                "30",
                "--json",
                extra_path=bin_dir,
            )
        )
        # the new key is made on the "device" (here, through the fake ssh)
        await eventually(lambda: (device_dir / "device.key").read_bytes() != old_key, 30)
        # until the device is heard from with it, the old certificate stays valid
        assert not rotate.done()
        assert old_cert.serial_number not in {r.serial for r in rig.site.revocations().revoked}
    # the agent restarted with the new key (what --restart-command does on a real device)
    link_downs = LinkDowns()
    async with agent_from(device_dir / "device.toml", link_downs) as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        press(agent)
        await eventually(lambda: alerts_of(database, "bell-0012") == 1)
        code, out, err = await asyncio.wait_for(rotate, 40)
        report = json.loads(out)
        assert code == 0, out + err
        assert report["revoked"] == [f"{old_cert.serial_number:X}"]
        code, out, err = await rig.ansimi(
            "provision", "device", "show", "bell-0012", "--dir", str(rig.site.layout.root),
            "--gateway", rig.url, "--json",
        )  # fmt: skip
        shown = json.loads(out)["device"]
        assert code == 0 and shown["state"] == "enrolled"
        assert {c["serial"]: c["revoked"] for c in shown["certificates"]} == {
            f"{old_cert.serial_number:X}": True,
            report["new_serial"]: False,
        }
        assert [e["rotate"] for e in shown["enrolments"]] == [True, False]
        # the new certificate keeps working after the broker's reload (the rotation has
        # waited for it): a press goes through, on the connection the reload left open
        press(agent)
        await eventually(lambda: alerts_of(database, "bell-0012") == 2)
        assert agent.link.connected and link_downs.count == 0


async def test_a_revoke_the_broker_missed_says_so_and_finishes_when_run_again(rig: Rig) -> None:
    added = await rig.add("bell-0013")
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "d13")
    assert code == 0, out + err
    gone = rig.tmp / "gone.pid"
    gone.write_text("4194303\n")  # above any pid this kernel hands out by default
    args = ["provision", "device", "revoke", "bell-0013", "--dir", str(rig.site.layout.root)]
    args += ["--gateway", rig.url, "--json"]
    code, out, err = await rig.ansimi(*args, "--pid-file", str(gone))
    assert code == 6, out + err
    assert "run this command again" in json.loads(out)["error"]
    device = rig.gateway.store.database.device("bell-0013")
    assert device is not None and device.revoked
    code, out, err = await rig.ansimi(*args, "--pid-file", str(rig.pid_file))
    assert code == 0, out + err
    report = json.loads(out)
    assert report["broker_reloaded"] and report["certificates_revoked"] == []


async def test_decommission_revokes_wipes_personal_data_and_keeps_the_events(rig: Rig) -> None:
    added = await rig.add("bell-0014")
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "device")
    assert code == 0, out + err
    store = rig.gateway.store
    # an alert in its history, and personal data (the store only ever holds it sealed)
    alert = Incoming("alert-0014", "bell-0014", 1, "alert", 1, "{}", "jws", ())
    store.database.add_event(alert, now_ms=1)
    assert store.database.set_private("bell-0014", "v1.k.sealed", 1)
    code, out, err = await rig.ansimi(
        "provision", "device", "decommission", "bell-0014", "--dir", str(rig.site.layout.root),
        "--gateway", rig.url, "--pid-file", str(rig.pid_file), "--json",
    )  # fmt: skip
    report = json.loads(out)
    assert code == 0, report
    assert report["revoked_at_gateway"] and report["wiped_at_gateway"]
    assert report["certificates_revoked"]
    device = store.database.device("bell-0014")
    assert device is not None and device.revoked and device.label == ""
    assert store.database.private("bell-0014") is None
    assert store.database.event("alert-0014") is not None  # the anonymised history stays


async def test_personal_data_goes_in_on_stdin_and_an_operator_of_the_district_reads_it(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # issue 19: the victim's address and phones could only be set with curl to a route found
    # in /openapi.json; they must never be on a command line (shell history, ps)
    added = await rig.add("bell-0015")
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "device")
    assert code == 0, out + err
    site = str(rig.site.layout.root)
    record = {
        "address": "12 Sejong-daero, Jung-gu",
        "floor": "3",
        "location": {"lat": 37.5665, "lon": 126.978},
        "phones": [{"role": "victim", "number": "+821012345678"}],
    }
    caplog.set_level("INFO", logger="gateway.private")
    code, out, err = await rig.ansimi(
        "provision", "device", "set-private", "bell-0015", "--dir", site, "--gateway", rig.url,
        stdin=json.dumps(record),
    )  # fmt: skip
    assert code == 0, out + err
    assert "installer set the personal data of bell-0015" in caplog.text
    # an admin cannot read it back: the district's operator can, and is logged doing so
    token_file = rig.tmp / "mapo-desk.token"
    token_file.write_text(OPERATOR)
    code, out, err = await rig.ansimi(
        "provision", "device", "show-private", "bell-0015", "--dir", site, "--gateway", rig.url,
        "--operator-token-file", str(token_file),
    )  # fmt: skip
    assert code == 0, out + err
    shown = json.loads(out)
    assert {k: shown[k] for k in ("address", "floor", "location")} == {
        k: record[k] for k in ("address", "floor", "location")
    }
    assert "mapo-desk read the personal data of bell-0015" in caplog.text


async def test_personal_data_that_cannot_be_stored_is_refused_naming_the_fix(rig: Rig) -> None:
    await rig.add("bell-0016")
    site = str(rig.site.layout.root)
    args = ("provision", "device", "set-private", "bell-0016", "--dir", site, "--gateway", rig.url)
    code, _out, err = await rig.ansimi(*args, stdin="address: 12 Sejong-daero")
    assert code == 1 and "not JSON" in err and '"phones": [{"role"' in err
    code, _out, err = await rig.ansimi(
        *args, stdin=json.dumps({"location": {"lat": 137, "lon": 1}})
    )
    assert code == 3 and "location.lat" in err
    assert "Sejong" not in err  # the input is never echoed


async def test_a_doorbell_enrolled_with_a_relative_state_dir_passes_its_selftest(
    rig: Rig,
) -> None:
    # issue 19: a relative --state-dir went into device.toml as it was, a fresh doorbell
    # failed selftest ("a doorbell needs doorbell_pin"), a PC got the gpiozero driver, and a
    # device key readable by others passed
    added = await rig.add("door-0017", "--type", "doorbell")
    where = rig.tmp / "installer"
    where.mkdir()
    code, out, err = await rig.ansimi(
        "device", "enrol", "--gateway", rig.url, "--token", str(added["token"]),
        "--ca-file", str(rig.site.layout.ca_cert), "--state-dir", "state",
        "--config-out", "device.toml", cwd=where,
    )  # fmt: skip
    assert code == 0, out + err
    assert 'driver = "fake"' in err and "not a Raspberry Pi" in err
    config = load_config(where / "device.toml", DeviceConfig)
    assert config.device.state_dir == where / "state"
    assert config.device.key_file == where / "state" / "device.key"
    assert config.mqtt.ca_file == where / "state" / "ca.crt"
    assert config.hardware.driver == "fake" and config.hardware.doorbell_pin == 27
    selftest = ("device", "selftest", "--config", str(where / "device.toml"))
    code, out, err = await rig.ansimi(*selftest)
    assert code == 0, out + err
    config.device.key_file.chmod(0o644)
    code, out, err = await rig.ansimi(*selftest)
    assert code == 1, out
    from device.cli import run_selftest

    (keys,) = [c for c in await run_selftest(config, where / "device.toml") if c.name == "keys"]
    assert keys.outcome == "fail" and f"chmod 600 {config.device.key_file}" in keys.detail


async def test_a_wrong_token_is_refused_naming_what_to_check(rig: Rig) -> None:
    # issue 19: each installer's mistake gets a message that names the fix
    token = str((await rig.add("bell-0018"))["token"])
    device_id, _, code_part = token.partition(".")
    where = rig.tmp / "d18"
    for wrong in (f"{device_id}.{code_part[:-4]}AAAA", f"bell-9999.{code_part}"):
        code, out, err = await rig.enrol(wrong, where)
        assert code == 3, out + err
        assert "not known here" in err and "copied whole" in err
        assert not where.exists()
    code, out, err = await rig.enrol(token, where)
    assert code == 0, out + err


async def test_a_wrong_gateway_url_says_which_part_to_fix(rig: Rig) -> None:
    token = str((await rig.add("bell-0019"))["token"])
    where = rig.tmp / "d19"
    api_port = rig.gateway.api.port

    async def enrol_at(url: str, ca: Path = rig.site.layout.ca_cert) -> tuple[int, str]:
        code, _out, err = await rig.ansimi(
            "device", "enrol", "--gateway", url, "--token", token, "--ca-file", str(ca),
            "--state-dir", str(where), "--config-out", str(where / "device.toml"),
        )  # fmt: skip
        return code, err

    code, err = await enrol_at(f"http://127.0.0.1:{api_port}")
    assert code == 2 and f"Fix: --gateway https://127.0.0.1:{api_port}" in err, err
    code, err = await enrol_at(f"https://127.0.0.1:{free_port()}")
    assert code == 4 and "nothing listens on that port" in err, err
    # the broker's port instead of the API's: mosquitto wants a client certificate
    code, err = await enrol_at(f"https://127.0.0.1:{rig.broker.port}")
    assert code == 4 and "it is not the HTTPS API; check the port" in err, err
    # the CA of another site: the gateway's certificate is not trusted
    init_site(rig.tmp / "other", site="other", listen_host="127.0.0.1", port=free_port())
    code, err = await enrol_at(rig.url, ca=Site.open(rig.tmp / "other").layout.ca_cert)
    assert code == 4 and "not trusted" in err and "--ca-file with the site CA" in err, err
    assert not where.exists()
    code, err = await enrol_at(rig.url)  # none of them spent the token
    assert code == 0, err


async def test_a_device_enrolled_again_under_its_id_is_told_to_rotate_and_that_works(
    rig: Rig,
) -> None:
    # issue 19: a bell's board replaced (or its card wiped) must enrol again as the same id
    added = await rig.add("bell-0020")
    code, out, err = await rig.enrol(str(added["token"]), rig.tmp / "old-board")
    assert code == 0, out + err
    site = str(rig.site.layout.root)
    code, out, err = await rig.ansimi(
        "provision", "device", "add", "--type", "bell", "--district", "mapo", "--id",
        "bell-0020", "--gateway", rig.url, "--dir", site, "--qr-dir", str(rig.tmp / "labels"),
        "--force-label",
    )  # fmt: skip
    assert code == 3 and "`ansimi provision device rotate bell-0020`" in err, err
    new_board = rig.tmp / "new-board"
    code, out, err = await rig.enrol(str(added["token"]), new_board)
    assert code == 3 and "used already" in err and "provision device rotate" in err, err
    # what the messages say: a rotation token, enrolled on the new board with --force
    code, out, err = await rig.ansimi(
        "provision", "device", "rotate", "bell-0020", "--dir", site, "--gateway", rig.url,
        "--json",
    )  # fmt: skip
    assert code == 6, out + err  # a rotation done by hand: `--finish` is still to come
    code, out, err = await rig.enrol(json.loads(out)["token"], new_board, "--force")
    assert code == 0, out + err
    assert load_config(new_board / "device.toml", DeviceConfig).device.id == "bell-0020"


async def test_an_admin_token_the_gateway_does_not_know_names_the_file_to_use(rig: Rig) -> None:
    wrong = rig.tmp / "old-admin.token"
    wrong.write_text("an-admin-token-of-another-site-0123")
    code, _out, err = await rig.ansimi(
        "provision", "device", "list", "--gateway", rig.url, "--dir", str(rig.site.layout.root),
        "--admin-token-file", str(wrong),
    )  # fmt: skip
    assert code == 3, err
    assert "the gateway does not know this admin token" in err
    assert "gateway/tokens/admin.token" in err and 'role = "admin"' in err


async def test_a_renewal_asked_as_the_bell_is_pressed_connects_only_once_the_incident_closed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Connecting with a new certificate cuts the link for a moment: not while an incident
    needs it. A press while the renewal is on its way to the gateway: the new certificate is
    kept, the link stays on the old one until the desk closes the incident. The agent's own
    look at start and the renewal asked here run one after the other: one certificate."""
    caplog.set_level("INFO", logger="gateway.enrol")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from device.enrol import make_csr
    from device.hal.ports import InputEvent

    added = await rig.add("bell-0021")
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 0, out + err
    config = load_config(device_dir / "device.toml", DeviceConfig)
    assert config.mqtt.cert_file is not None
    key = load_private_key(config.device.key_file)
    short = rig.site.sign_csr(make_csr(key, "bell-0021").encode(), "bell-0021", days=40)
    config.mqtt.cert_file.write_bytes(short.public_bytes(serialization.Encoding.PEM))
    clock = [wall_ms() + 11 * 86_400_000]  # 29 days left: the renewal is due
    assert rig.gateway.enrolment is not None
    rig.gateway.enrolment._clock_ms = lambda: clock[0]
    async with agent_from(device_dir / "device.toml", clock_ms=lambda: clock[0]) as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        connects = agent.connects
        renewing = asyncio.create_task(agent.renew_certificate())
        await asyncio.sleep(0)  # the request is on its way (on its own thread)
        agent.on_input(InputEvent("emergency", "pressed"))
        agent.on_input(InputEvent("emergency", "released"))
        incident = agent.behaviour.incident
        assert incident is not None
        assert await renewing is None  # renewed, not connected with: the incident's link
        assert agent.renewal_held_by == "an incident is open"
        on_disk = x509.load_pem_x509_certificate(config.mqtt.cert_file.read_bytes())
        assert on_disk.serial_number != short.serial_number
        assert await agent.renew_certificate() is None  # still open: still held
        assert agent.connects == connects  # the link was never cut while it was open
        # the desk closes it; the bell hears so
        rig.gateway.downlink.ack("bell-0021", incident.alert_id, "closed")
        await eventually(lambda: agent.behaviour.incident is None and agent.outbox.depth() == 0)
        assert agent.connects == connects  # the link was never cut meanwhile
        renewed = await agent.renew_certificate()
        assert renewed is not None and renewed.serial == f"{on_disk.serial_number:X}"
        assert agent.renewal_held_by is None
        await eventually(lambda: agent.connects > connects and agent.link.connected)
        assert caplog.text.count("renew: bell-0021 renewed") == 1, caplog.text


async def test_a_device_renews_its_certificate_before_expiry_and_connects_with_it(
    rig: Rig,
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from device.enrol import make_csr
    from device.renew import Renewal, RenewalFailed
    from protocol.keys import generate_key

    added = await rig.add("bell-0009")
    device_dir = rig.tmp / "device"
    code, out, err = await rig.enrol(str(added["token"]), device_dir)
    assert code == 0, out + err
    config = load_config(device_dir / "device.toml", DeviceConfig)
    assert config.renew.gateway_url == rig.url  # enrolment says where to renew
    # a certificate for 40 days instead of years, so the renewal point (30 days before)
    # is 10 days ahead
    assert config.mqtt.cert_file is not None
    key = load_private_key(config.device.key_file)
    short = rig.site.sign_csr(make_csr(key, "bell-0009").encode(), "bell-0009", days=40)
    config.mqtt.cert_file.write_bytes(short.public_bytes(serialization.Encoding.PEM))
    clock = [wall_ms()]
    # the gateway's time moves with the device's: both clocks agree, as NTP keeps them
    assert rig.gateway.enrolment is not None
    rig.gateway.enrolment._clock_ms = lambda: clock[0]
    async with agent_from(device_dir / "device.toml", clock_ms=lambda: clock[0]) as agent:
        await asyncio.wait_for(agent.ready.wait(), 10)
        assert await agent.renew_certificate() is None  # 40 days left: not yet
        clock[0] += 11 * 86_400_000  # past the renewal point
        connects = agent.connects
        renewed = await agent.renew_certificate()
        assert renewed is not None and renewed.serial != f"{short.serial_number:X}"
        on_disk = x509.load_pem_x509_certificate(config.mqtt.cert_file.read_bytes())
        assert f"{on_disk.serial_number:X}" == renewed.serial
        assert on_disk.public_key() == key.public_key()  # the same key, a new certificate
        assert not agent.renewal.due()
        # the session connected again, with the new certificate, to the running broker
        await eventually(lambda: agent.connects > connects and agent.link.connected)
        # the site knows it: certificate expiry watching sees the newer one
        issued = {f"{c.serial_number:X}" for c in rig.site.issued()}
        assert renewed.serial in issued
        # a renewal signed by another key is refused, and changes nothing
        stranger = Signer("bell-0009", generate_key())
        forged = Renewal(config, stranger, now_ms=lambda: clock[0])
        with pytest.raises(RenewalFailed, match="proof is refused"):
            await asyncio.to_thread(forged.renew)
        assert x509.load_pem_x509_certificate(config.mqtt.cert_file.read_bytes()) == on_disk
        refused = {"reason": "renewal"}
        registry = rig.gateway.metrics.registry
        assert registry.get_sample_value("ansimi_api_refused_total", refused) == 1
