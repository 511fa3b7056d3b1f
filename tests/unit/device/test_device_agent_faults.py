"""Never mute on the bell's side: a wrong clock, a lost counter, a damaged or full outbox.

No broker: downlink messages are signed by a gateway key and handed to the link as the MQTT
session would; what the agent publishes is recorded on its way to the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_faults_kit import FullDisk

from ansimi.mqtt import Message as MqttMessage
from device.agent import Agent
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.outbox import Outbox
from protocol.envelope import seal
from protocol.jws import Signer, verify
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import (
    Ack,
    AlertMessage,
    Command,
    Health,
    HealthMessage,
    Message,
    Sync,
    build_message,
    parse_message,
)
from protocol.topics import down_topic

DEVICE = "bell-0001"
GATEWAY_NOW = 1_800_000_000_000
TEN_MINUTES_MS = 600_000


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


class Bell:
    """An agent on fake hardware whose system clock the test sets, and its gateway's key."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        clock_ms: int,
        outbox: Outbox | None = None,
        gateway: Signer | None = None,
    ) -> None:
        self.gateway = gateway or Signer("gw-test", generate_key())
        self.device = Signer(DEVICE, generate_key())
        config = DeviceConfig.model_validate(
            {
                "device": {"id": DEVICE, "state_dir": tmp_path},
                "gateway": {
                    "id": self.gateway.kid,
                    "public_key": public_key_to_b64(self.gateway.public_key),
                },
                "outbox": {"resend_min_s": 2, "resend_max_s": 30},
            }
        )
        self.clock = Clock(clock_ms)
        self.inputs = FakeInputs()
        self.agent = Agent(
            config,
            signer=self.device,
            gateway_key=self.gateway.public_key,
            hardware=Hardware(self.inputs, FakeIndicator(), None, None),
            outbox=outbox,
            clock_ms=self.clock,
            rng=random.Random(1),
        )
        # what goes on the wire, as the broker would get it
        self.published: list[Message] = []

        def publish(
            topic: str, payload: bytes, *, retain: bool = False, urgent: bool = False
        ) -> asyncio.Future[None]:
            verified = verify(payload, {DEVICE: self.device.public_key}.__getitem__)
            self.published.append(parse_message(verified.payload))
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done

        self.agent.link.session.publish = publish  # type: ignore[method-assign,assignment]
        self.inputs.start(self.agent.on_input)
        self._down_seq = 1_000

    def press(self) -> None:
        self.inputs.press("emergency")
        self.inputs.release("emergency")

    def alerts(self) -> list[AlertMessage]:
        return [m for m in self.published if isinstance(m, AlertMessage)]

    def link_rejected(self) -> dict[str, int]:
        return dict(self.agent.link.rejected)

    def health(self) -> list[Health]:
        return [m.body for m in self.published if isinstance(m, HealthMessage)]

    def down(self, body: Ack | Command | Sync, *, ts: int = GATEWAY_NOW) -> MqttMessage:
        """A gateway message, signed, arriving on this device's down topic; returned, so
        that a test can play it again as someone who captured it would."""
        self._down_seq += 1
        message: Message = build_message(body, device=DEVICE, seq=self._down_seq, ts=ts)
        token = seal(message, self.gateway).encode()
        raw = MqttMessage(down_topic(DEVICE, message.type), token, 1)
        self.agent.link._on_message(raw)
        return raw


# ---- the clock ---------------------------------------------------------------------------


async def test_a_sync_corrects_the_clock_offset_and_the_bell_reports_it(tmp_path: Path) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW + TEN_MINUTES_MS)
    bell.press()
    alert_id = bell.alerts()[0].id
    bell.down(Sync(ref=alert_id, reason="clock", next_seq=1))
    await asyncio.sleep(0)
    assert bell.agent.now_ms() == GATEWAY_NOW  # the offset, not the system clock
    assert bell.clock.ms == GATEWAY_NOW + TEN_MINUTES_MS
    (health,) = bell.health()
    assert (health.event, health.skew_ms) == ("clock_corrected", TEN_MINUTES_MS)
    # the report waits in the outbox for `received`, like an alert
    assert {e.type for e in bell.agent.outbox.pending()} == {"alert", "health"}
    # the alert keeps its age on the corrected clock: the SMS fallback counts from the press
    (alert_entry,) = [e for e in bell.agent.outbox.pending() if e.id == alert_id]
    assert alert_entry.created_ms == GATEWAY_NOW
    # and everything waiting goes again, signed with the corrected time
    assert bell.agent._resend_all
    for entry in bell.agent.outbox.pending():
        bell.agent._resend(entry)
    assert {m.ts for m in bell.published[-2:]} == {GATEWAY_NOW}


async def test_a_skewed_bell_takes_acks_and_after_a_sync_commands_too(tmp_path: Path) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW - TEN_MINUTES_MS)
    bell.press()
    alert_id = bell.alerts()[0].id
    # an ack names our own message: the clock does not matter
    bell.down(Ack(ref=alert_id, stage="received"))
    assert bell.agent.outbox.depth() == 0
    # a command names nothing: outside the window of our clock it is refused...
    bell.down(Command(name="set_silent", args={"silent": True}))
    assert bell.link_rejected() == {"stale": 1}
    assert not bell.agent.behaviour.silent
    # ...until a sync has told us the gateway's time
    bell.down(Sync(ref=alert_id, reason="clock", next_seq=1))
    bell.down(Command(name="set_silent", args={"silent": True}))
    assert bell.agent.behaviour.silent


async def test_a_sync_that_names_no_recent_message_of_ours_is_ignored(tmp_path: Path) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW + TEN_MINUTES_MS)
    bell.down(Sync(ref="not-ours-000001", reason="clock", next_seq=10**9))
    assert bell.link_rejected() == {"replay": 1}
    assert bell.agent.clock_offset_ms == 0
    assert bell.agent.outbox.next_seq() < 10**9


async def test_a_captured_sync_played_again_changes_nothing(tmp_path: Path) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW + TEN_MINUTES_MS)
    bell.press()
    alert_id = bell.alerts()[0].id
    captured = bell.down(Sync(ref=alert_id, reason="clock", next_seq=1))
    assert bell.agent.now_ms() == GATEWAY_NOW
    # an hour on, the bell's clock is right; the old sync, played again, would set it back
    bell.clock.ms += 3_600_000
    bell.agent.link._on_message(captured)
    assert bell.link_rejected() == {"replay": 1}
    assert bell.agent.now_ms() == GATEWAY_NOW + 3_600_000
    # nor after a restart that lost the downlink high-water mark: the ref is forgotten
    (tmp_path / "again").mkdir()
    again = Bell(tmp_path / "again", clock_ms=GATEWAY_NOW + TEN_MINUTES_MS, gateway=bell.gateway)
    again.agent.link._on_message(captured)
    assert again.link_rejected() == {"replay": 1}
    assert again.agent.clock_offset_ms == 0


async def test_a_broker_replaying_thousands_of_stale_copies_is_counted_and_logged_sparingly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a RabbitMQ failover handed two bells ~30,000 stale downlinks in two minutes: a line
    # each would fill a bell's SD card
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW)
    bell.press()
    stale = bell.down(Ack(ref=bell.alerts()[0].id, stage="received"))
    for _ in range(3_000):
        bell.agent.link._on_message(stale)
    assert bell.link_rejected() == {"replay": 3_000}
    lines = [r.getMessage() for r in caplog.records if "ignored a downlink" in r.getMessage()]
    assert lines == [f"link {DEVICE}: ignored a downlink message: replay"]


async def test_resends_into_a_silent_downlink_begin_a_new_session(tmp_path: Path) -> None:
    # RabbitMQ 3.10 after a node's SIGKILL took bells' alerts (PUBACK, at the centre) but
    # never delivered the gateway's `received`: the bell resent for ever on that connection
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW)
    link = bell.agent.link
    now = [1_000.0]
    link._monotonic = lambda: now[0]
    link.session._connected.set()
    link._connected(session_present=True)
    reconnects: list[float] = []
    link.session.start_afresh = lambda: reconnects.append(now[0])  # type: ignore[method-assign]
    bell.press()  # the first send is no resend
    (entry,) = bell.agent.outbox.pending()

    def resend_after(seconds: float, times: int = 1) -> None:
        for _ in range(times):
            now[0] += seconds
            bell.agent._resend(entry)

    resend_after(11, times=2)  # two resends, 22 s of silence: a slow gateway, maybe
    assert reconnects == []
    resend_after(1)
    assert reconnects == [1_023.0]
    # still nothing after that reconnect: the silence must last twice as long next time
    link._connected(session_present=True)
    resend_after(13, times=3)
    assert reconnects == [1_023.0]
    resend_after(1)
    assert reconnects == [1_023.0, 1_063.0]
    # anything heard on the downlink, even refused, shows it works: the count starts again
    link._connected(session_present=True)
    resend_after(15, times=2)
    bell.down(Ack(ref="not-ours-000001", stage="received"))
    resend_after(15, times=2)
    assert reconnects == [1_023.0, 1_063.0]
    resend_after(1)  # and the wait is back to 20 s
    assert reconnects == [1_023.0, 1_063.0, 1_124.0]
    # while disconnected, resends are not the connection's fault
    link.session._connected.clear()
    resend_after(60, times=5)
    assert len(reconnects) == 3


async def test_a_sync_for_the_counter_that_finds_the_clock_far_off_reports_it(
    tmp_path: Path,
) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW - TEN_MINUTES_MS)
    bell.press()
    alert_id = bell.alerts()[0].id
    bell.down(Sync(ref=alert_id, reason="sequence", next_seq=50))
    assert bell.agent.now_ms() == GATEWAY_NOW
    assert [(h.event, h.skew_ms) for h in bell.health()] == [("clock_corrected", -TEN_MINUTES_MS)]


async def test_a_sync_within_the_tolerance_leaves_the_clock_alone(tmp_path: Path) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW + 300)  # transit time, not a skew
    bell.press()
    alert_id = bell.alerts()[0].id
    bell.down(Sync(ref=alert_id, reason="sequence", next_seq=50))
    await asyncio.sleep(0)
    assert bell.agent.clock_offset_ms == 0
    assert bell.health() == []


# ---- the counter -------------------------------------------------------------------------


async def test_a_sync_raises_the_counter_and_the_waiting_alert_goes_again_above_it(
    tmp_path: Path,
) -> None:
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW)
    bell.press()
    alert_id = bell.alerts()[0].id
    bell.down(Sync(ref=alert_id, reason="sequence", next_seq=7_001))
    first = bell.alerts()[0]
    for entry in bell.agent.outbox.pending():
        bell.agent._resend(entry)
    resent = bell.alerts()[-1]
    # the same alert, signed again with a number the gateway takes
    assert (resent.id, resent.body) == (first.id, first.body)
    assert first.seq < 7_001 <= resent.seq


# ---- the outbox --------------------------------------------------------------------------


async def test_a_recovered_outbox_is_reported_at_start(tmp_path: Path) -> None:
    (tmp_path / "outbox.db").write_bytes(b"not a database" * 100)
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW)
    bell.agent.report_outbox_recovery()
    (health,) = bell.health()
    assert (health.event, health.salvaged) == ("outbox_recovered", 0)
    assert health.detail is not None and "not a database" in health.detail


async def test_a_full_disk_during_presses_swallows_none_of_them(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    disk = FullDisk(outbox._db)
    outbox._db = disk  # type: ignore[assignment]
    bell = Bell(tmp_path, clock_ms=GATEWAY_NOW, outbox=outbox)
    disk.full = True
    for presses in range(1, 8):
        bell.press()
        await asyncio.sleep(0)
        alert = bell.alerts()[-1]
        alert_id = alert.id
        # each press goes out (later ones counted in an update of the incident)...
        assert alert.body.presses == presses
        # ...and stays, in memory, until the gateway has it
        assert alert_id in {e.id for e in outbox.pending()}
        bell.down(Ack(ref=alert_id, stage="received"))
        assert alert_id not in {e.id for e in outbox.pending()}
    assert [h.event for h in bell.health()] == ["storage_failed"]
    disk.full = False
    bell.press()
    await asyncio.sleep(0)
    assert [h.event for h in bell.health()] == ["storage_failed", "storage_restored"]
    assert bell.alerts()[-1].body.presses == 8
    # the reports themselves were kept: on disk now
    assert not outbox.storage_failing


@contextlib.contextmanager
def tiny_disk(where: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), or a skip where this runner may not mount one."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the file to delete to free them."""
    filler = disk / "filler"
    # unbuffered: the write that finds no room fails there, not at close
    with filler.open("wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 4096)
    return filler


async def test_a_really_full_disk_during_presses_swallows_none_of_them(tmp_path: Path) -> None:
    with tiny_disk(tmp_path / "disk") as disk:
        outbox = Outbox(disk / "outbox.db")
        bell = Bell(tmp_path, clock_ms=GATEWAY_NOW, outbox=outbox)
        filler = fill(disk)
        sent = 0
        for _ in range(20):
            bell.press()
            await asyncio.sleep(0)
            alert = bell.alerts()[-1]
            sent += 1
            assert alert.body.presses == sent
            bell.down(Ack(ref=alert.id, stage="received"))
        assert "storage_failed" in [h.event for h in bell.health()]
        filler.unlink()
        bell.press()
        await asyncio.sleep(0)
        assert bell.alerts()[-1].body.presses == sent + 1
        assert [h.event for h in bell.health()] == ["storage_failed", "storage_restored"]
        assert not outbox.storage_failing
        outbox.close()
