"""Health that tells the truth, against a real mosquitto and the real gateway process.

Each test breaks one path (the broker link black-holed, the broker restarted, the centre
stopped, the disk filled) and asserts that /healthz says so within its bound, and that the
gateway heals by itself once the fault is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from ansimi_testkit import SECRET, eventually, notified, notify_socket
from gw_itkit import TOKEN, WAIT_S, Fleet, GatewayProcess, agents_running, centre_alerts

from ansimi.broker import Mosquitto, MosquittoConfig, free_port
from console.receiver import EventLog, Receiver
from protocol.clock import wall_ms
from simulator.proxy import FaultProxy

RED_WITHIN_S = 15.0  # the bound: a broken path shows within 15 s


class Sink:
    """The reference centre receiver on a fixed port, that the test can stop and start."""

    def __init__(self, tmp_path: Path) -> None:
        self.receiver = Receiver(SECRET, EventLog(tmp_path / "centre.db"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.receiver.app())
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def sink(tmp_path: Path) -> AsyncIterator[Sink]:
    centre = Sink(tmp_path)
    await centre.start()
    try:
        yield centre
    finally:
        await centre.stop()
        centre.receiver.events.close()


@contextlib.asynccontextmanager
async def gateway(
    fleet: Fleet,
    centre_url: str,
    *,
    top: str = "",
    health: str = "",
    broker_port: int | None = None,
    quiet: bool = True,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[GatewayProcess]:
    """The real gateway process, ready (its intake proven by a probe heard back) unless
    not `wait_ready`."""
    api_port = free_port()
    path = fleet.write_config("gw-a", centre_url, api_port)
    text = path.read_text()
    if broker_port is not None:  # through a proxy, say
        text = text.replace(f"port = {fleet.broker.port}\n", f"port = {broker_port}\n", 1)
    # top-level keys must come before the first table, [health] may come after the last
    path.write_text(f"{top}\n{text}\n[health]\n{health}\n")
    process = GatewayProcess(path, api_port)
    process.start(env=env)
    try:
        if wait_ready:
            await process.ready()
        yield process
    finally:
        process.stop()
        if quiet:  # no error that was not the test's own doing
            assert "Traceback" not in process.log.read_text()


async def healthz(gw: GatewayProcess, *, detail: bool = True) -> tuple[int, dict[str, Any]]:
    """/healthz, with the details an API token gets, or as anyone sees it."""
    url = f"http://127.0.0.1:{gw.api_port}/healthz"
    headers = {"Authorization": f"Bearer {TOKEN}"} if detail else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=3)) as response,
    ):
        return response.status, await response.json()


async def until(
    gw: GatewayProcess,
    holds: Callable[[int, dict[str, Any]], bool],
    timeout_s: float,
    *,
    detail: bool = True,
) -> tuple[float, dict[str, Any]]:
    """Poll /healthz until `holds(status, body)`; the seconds it took, and the body."""
    start = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, body = await healthz(gw, detail=detail)
            if holds(status, body):
                return time.monotonic() - start, body
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"/healthz not as expected: {gw.log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)


def deaf(status: int, body: dict[str, Any]) -> bool:
    return status == 503 and "intake" in body["failing"]


def green(status: int, body: dict[str, Any]) -> bool:
    return status == 200 and body["status"] == "ok"


def statuses_from_gateway(tmp_path: Path) -> list[str]:
    """The states of the status events about the gateway itself the centre has."""
    with contextlib.closing(sqlite3.connect(tmp_path / "centre.db")) as db:
        rows = db.execute(
            "SELECT body FROM events WHERE type = 'status' AND device_id = 'gw-test' ORDER BY ts_ms"
        )
        return [json.loads(body)["state"] for (body,) in rows]


# ---- intake ------------------------------------------------------------------------------


async def test_a_black_holed_broker_link_is_red_within_15s_and_green_once_healed(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    proxy = FaultProxy(mosquitto.host, mosquitto.port)
    await proxy.start()
    fleet = Fleet.create(tmp_path, mosquitto, 0)
    try:
        async with (
            sink(tmp_path) as centre,
            gateway(fleet, centre.url, broker_port=proxy.port) as gw,
        ):
            assert green(*await healthz(gw))
            # the socket stays open and nothing passes: MQTT keepalive would take ~60 s
            proxy.hold({"gw-a"})
            took, body = await until(gw, deaf, RED_WITHIN_S + 5)
            assert took <= RED_WITHIN_S, took
            assert body["ok"] is False and body["intake"]["silent_s"] >= 10
            # still deaf a bound later: resubscribing did not help, so it reconnects
            deadline = time.monotonic() + WAIT_S
            while not re.search(r"intake deaf for [\d.]+ s: reconnect", gw.log.read_text()):
                assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            proxy.heal({"gw-a"})
            await until(gw, green, WAIT_S)
    finally:
        await proxy.close()


async def test_a_broker_restart_that_forgets_the_shared_subscription_is_repaired(
    tmp_path: Path,
) -> None:
    """FIELD-NOTES: mosquitto 2.0.11 restores the session but not its $share subscription;
    the gateway must hear again by itself, and a bell pressed after the restart reach the
    centre, without anyone restarting the gateway."""
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker", autosave_interval_s=1))
    broker.start()
    try:
        fleet = Fleet.create(tmp_path, broker, 1)
        async with (
            sink(tmp_path) as centre,
            gateway(fleet, centre.url) as gw,
        ):
            # the broker's autosave after the gateway subscribed: its session is on disk
            saved = tmp_path / "broker" / "mosquitto.db"
            subscribed_at = time.time()
            await eventually(lambda: saved.exists() and saved.stat().st_mtime > subscribed_at)
            await asyncio.to_thread(broker.stop)  # SIGTERM: a `systemctl restart`
            await asyncio.to_thread(broker.start)
            async with agents_running(fleet):
                fleet.press_all()
                deadline = time.monotonic() + WAIT_S
                while not centre_alerts(tmp_path):
                    assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                    await asyncio.sleep(0.2)
            await until(gw, green, WAIT_S)
    finally:
        broker.stop()


# ---- the watchdog: pinging unless a restart may help (gateway/health.py) ----------------

# a short deafness bound, so that the whole repair ladder (resubscribe at 2 s, reconnect at
# 4 s, then a bound of the new connection) is over in ~7 s
FAST_LADDER = "probe_s = 0.5\nintake_deaf_s = 2.0"
LADDER_S = 10.0
WATCHDOG_ENV = {"WATCHDOG_USEC": "400000"}  # a ping every 0.2 s


async def pings_within(sock: socket.socket, seconds: float) -> int:
    notified(sock)
    await asyncio.sleep(seconds)
    return notified(sock).count(b"WATCHDOG=1")


@contextlib.asynccontextmanager
async def watched(
    tmp_path: Path, config: MosquittoConfig, *, wait_ready: bool = True
) -> AsyncIterator[tuple[Mosquitto, GatewayProcess, socket.socket]]:
    """A broker of our own, and the gateway on it, pinging a notify socket as systemd's."""
    broker = Mosquitto(config)
    broker.start()
    try:
        fleet = Fleet.create(tmp_path, broker, 0)
        with notify_socket() as (path, sock):
            async with (
                sink(tmp_path) as centre,
                gateway(
                    fleet,
                    centre.url,
                    health=FAST_LADDER,
                    env={"NOTIFY_SOCKET": path, **WATCHDOG_ENV},
                    wait_ready=wait_ready,
                ) as gw,
            ):
                yield broker, gw, sock
    finally:
        broker.stop()


async def test_the_watchdog_keeps_pinging_through_a_broker_outage(tmp_path: Path) -> None:
    """A restart brings no broker back, and would interrupt forwarding: 503, but pings."""
    config = MosquittoConfig(state_dir=tmp_path / "broker")
    async with watched(tmp_path, config) as (broker, gw, sock):
        assert await pings_within(sock, 1.0) >= 2
        await asyncio.to_thread(broker.stop)
        await until(gw, lambda s, b: s == 503 and b["mqtt"] == "disconnected", WAIT_S)
        await asyncio.sleep(LADDER_S)  # deaf, well past the ladder's length
        assert await pings_within(sock, 1.0) >= 2
        assert deaf(*await healthz(gw))
        await asyncio.to_thread(broker.start)
        await until(gw, green, WAIT_S)
        assert await pings_within(sock, 1.0) >= 2


async def test_connected_yet_deaf_past_the_ladder_stops_the_watchdog(tmp_path: Path) -> None:
    """The broker takes our connection but drops our probes (an ACL that denies them):
    resubscribe and reconnect do not help, so the pings stop and systemd would restart the
    gateway. Once the broker delivers them again, the pings come back by themselves."""
    acl = tmp_path / "acl"
    deny = "topic deny ansimi/v1/gw-test/up/probe\n"
    allow = "topic readwrite #\n"
    acl.write_text(deny + allow)
    config = MosquittoConfig(state_dir=tmp_path / "broker", acl_file=acl)
    async with watched(tmp_path, config, wait_ready=False) as (broker, gw, sock):
        deadline = time.monotonic() + WAIT_S
        while "watchdog pings withheld" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        log = gw.log.read_text()
        assert "intake deaf for" in log and ": reconnect" in log
        assert await pings_within(sock, 2.0) == 0  # 10 intervals
        status, body = await healthz(gw)
        assert (status, body["mqtt"], body["failing"]) == (503, "connected", ["intake"])
        acl.write_text(allow)
        broker.reload()
        await until(gw, green, WAIT_S)
        assert await pings_within(sock, 1.0) >= 2


# ---- forwarding --------------------------------------------------------------------------


async def test_a_centre_down_is_degraded_naming_it_and_clears_when_it_is_back(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 1)
    async with (
        sink(tmp_path) as centre,
        gateway(fleet, centre.url, health="centre_down_s = 5.0") as gw,
        agents_running(fleet),
    ):
        await centre.stop()
        fleet.press_all()
        took, body = await until(
            gw, lambda s, b: s == 200 and "centre:central" in b["degraded"], WAIT_S
        )
        assert took <= RED_WITHIN_S, took
        assert body["status"] == "degraded" and body["failing"] == []
        assert body["centres"]["central"]["ok"] is False
        assert body["centres"]["central"]["failing_since_ms"] <= wall_ms()
        assert 'ansimi_centre_down{centre="central"} 1.0' in gw.metrics_text()
        # without a token: degraded by a centre, but not which one, since when, or why
        status, public = await healthz(gw, detail=False)
        assert (status, public) == (
            200,
            {"ok": True, "status": "degraded", "failing": [], "degraded": ["centre"]},
        )
        await centre.start()
        await until(gw, green, WAIT_S)
        # green once any delivery is taken (an online status may go first): the alert follows
        # at its own backoff
        await eventually(lambda: len(centre_alerts(tmp_path)) == 1, WAIT_S)


# ---- the disk ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(where: Path, size_mb: int) -> Any:
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def press_until_one_is_not_kept(fleet: Fleet, tmp_path: Path) -> int:
    """Press (on a full disk) until an alert is not kept; how many presses that took.

    The gateway truncates its WAL at every look while the disk is low, and a commit that
    comes between that and the filler taking the space back is kept (CI once saw it): then
    the alert is at the centre, and the next press is tried."""
    at_centre = len(centre_alerts(tmp_path))
    for presses in range(1, 4):
        fleet.press_all()
        await asyncio.sleep(3.0)  # a kept alert is at the centre within milliseconds
        if len(centre_alerts(tmp_path)) == at_centre:
            return presses
        at_centre = len(centre_alerts(tmp_path))
    raise AssertionError("three alerts in a row were kept on a full disk")


def fill(filler: Path, leave_bytes: int) -> None:
    """Grow `filler` until the file system is full, then give back `leave_bytes`."""
    with filler.open("ab", buffering=0) as f:  # unbuffered: close() has nothing to fail
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
                f.flush()
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))


def free_bytes(where: Path) -> int:
    stat = os.statvfs(where)
    return stat.f_bavail * stat.f_frsize


async def test_a_small_full_disk_keeps_alerts_says_disk_low_and_recovers_by_itself(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    with small_disk(tmp_path / "gateway", 8) as disk:
        fleet = Fleet.create(tmp_path, mosquitto, 1)
        filler = disk / "filler"
        async with (
            sink(tmp_path) as centre,
            # the intake logs each commit the full disk refuses, with its traceback
            gateway(fleet, centre.url, top="disk_reserve_mb = 3.0", quiet=False) as gw,
            agents_running(fleet),
        ):
            # below the reserve: degraded, one disk_low, and alerts still kept and sent
            fill(filler, 2_000_000)
            _, body = await until(gw, lambda s, b: s == 200 and "disk" in b["degraded"], WAIT_S)
            assert body["disk"]["ok"] is False and body["disk"]["reserve_mb"] == 3.0
            fleet.press_all()
            deadline = time.monotonic() + WAIT_S
            while len(centre_alerts(tmp_path)) < 1 or not statuses_from_gateway(tmp_path):
                assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            assert statuses_from_gateway(tmp_path) == ["disk_low"]
            # not a byte left (anything the gateway's checkpoints give back is taken at
            # once): the next alert cannot be kept, and the bell keeps it and resends

            async def kept_full() -> None:
                while True:
                    fill(filler, 0)
                    await asyncio.sleep(0.1)

            filling = asyncio.create_task(kept_full())
            try:
                pressed = await press_until_one_is_not_kept(fleet, tmp_path)
                # the broker delivers, the probe is heard, yet nothing is kept: red, naming it
                took, body = await until(
                    gw, lambda s, b: s == 503 and "store" in b["failing"], WAIT_S
                )
                assert body["intake"]["ok"] is True and took < 15, (took, body)
            finally:
                filling.cancel()
            assert fleet.pending() == 1
            # space freed: the gateway takes it by itself, no restart, and says so
            filler.unlink()
            deadline = time.monotonic() + WAIT_S
            while (
                len(centre_alerts(tmp_path)) < 1 + pressed
                or len(statuses_from_gateway(tmp_path)) < 2
            ):
                assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
                await asyncio.sleep(0.2)
            assert statuses_from_gateway(tmp_path) == ["disk_low", "disk_ok"]
            await until(gw, green, WAIT_S)
            assert fleet.pending() == 0
            # the WAL was given back, not left at its high-water mark
            assert (disk / "gateway.db-wal").stat().st_size < 1_000_000
            assert free_bytes(disk) > 6_000_000
