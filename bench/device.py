"""Device agent: press to PUBACK against a bare paho publish, RSS, start to connected.

- press to PUBACK: a fake pin edge (gpiozero MockFactory, the real gpiozero adapter) through
  the bridge to the loop, the behaviour, the outbox commit (SQLite WAL, written before the
  publish; its fsync overlaps the round trip and is timed too), the signature and the QoS 1
  publish, until the broker's PUBACK. Baseline: a bare paho client publishing a payload of
  the same size at QoS 1 and waiting for its PUBACK, on the same broker, interleaved with
  the presses. The ratio is p50 over p50 (goal <= 2).
- RSS and start to connected: `ansimi device run` as its own process on fake hardware,
  from spawn until its `online` status reaches the broker (goal <= 1.5 s), then its
  resident memory after a few presses (goal <= 40 MB).

Loopback only; bounded in count and time. Run: .venv/bin/python bench/device.py
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this file's own directory leads sys.path, and this file (also named
# "device") would shadow the package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import paho.mqtt.client as paho  # noqa: E402
from gpiozero.pins.mock import MockFactory  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from ansimi.broker import Mosquitto, MosquittoConfig  # noqa: E402
from ansimi.mqtt import Message as MqttMessage  # noqa: E402
from ansimi.mqtt import Session, Settings  # noqa: E402
from device.agent import Agent  # noqa: E402
from device.config import DeviceConfig  # noqa: E402
from device.hal import build_hardware  # noqa: E402
from device.hal.config import HardwareConfig  # noqa: E402
from device.observer import AgentObserver  # noqa: E402
from device.outbox import Outbox  # noqa: E402
from protocol.jws import Signer, verify  # noqa: E402
from protocol.keys import generate_key, public_key_to_b64, save_private_key  # noqa: E402
from protocol.messages import Ack, Alert, Body, parse_message  # noqa: E402

SAMPLES = 1000
WARMUP = 10
STEP_TIMEOUT_S = 5.0
DEVICE_ID = "bell-bench"
BUTTON = 17


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BarePaho:
    """A plain paho client with its own network thread: paho's default way of running."""

    def __init__(self, broker: Mosquitto) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5
        )
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("bare paho client did not connect")
            time.sleep(0.01)

    def publish(self, payload: bytes, i: int) -> float:
        """Seconds from publish to PUBACK (blocks the caller meanwhile)."""
        start = time.perf_counter()
        info = self.client.publish(f"bench/bare/{i % 10}", payload, qos=1)
        info.wait_for_publish(STEP_TIMEOUT_S)
        if not info.is_published():
            raise RuntimeError("bare paho publish got no PUBACK")
        return time.perf_counter() - start

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Latencies:
    press: list[float] = field(default_factory=list)  # pin edge to PUBACK
    commit: list[float] = field(default_factory=list)  # the outbox commit within it
    power_safe: list[float] = field(default_factory=list)  # pin edge to outbox fsynced
    bare: list[float] = field(default_factory=list)
    session: list[float] = field(default_factory=list)
    payload_bytes: int = 0


class PublishTimer(AgentObserver):
    """When the broker has each message the agent published (its PUBACK)."""

    def __init__(self, acked: asyncio.Queue[tuple[float, str]]) -> None:
        self.broker_has = acked

    def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
        if message_id is not None:
            published.add_done_callback(
                lambda _: self.broker_has.put_nowait((time.perf_counter(), message_id))
            )


class TimedOutbox(Outbox):
    """The outbox, timing each commit of a press (the write the publish waits for)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.commits: list[float] = []

    def put(
        self,
        message_id: str,
        type: str,
        body_json: str,
        now_ms: int,
        *,
        sms: bool = False,
        resend_at_ms: int | None = None,
    ) -> bool:
        begin = time.perf_counter()
        kept = super().put(message_id, type, body_json, now_ms, sms=sms, resend_at_ms=resend_at_ms)
        self.commits.append(time.perf_counter() - begin)
        return kept


async def press_and_publish_latencies(broker: Mosquitto, state: Path, samples: int) -> Latencies:
    """Interleaved rounds of: one press on the agent, one bare paho publish, one publish
    through `ansimi.mqtt.Session` alone (the agent's transport, without the agent), each
    round-trip to PUBACK on the same broker. Interleaving gives all three the same machine,
    so drift on a shared host moves them together and the ratio stays put.

    A press is a fake pin edge through the real gpiozero adapter, the bridge to the loop,
    the behaviour, the outbox commit (written to the WAL before the publish), the signature
    and the QoS 1 publish. The fsync that makes the commit survive a power cut overlaps
    the round trip; it is awaited after each press (and timed: `power_safe`), so a press
    does not meet the previous one's fsync, as presses seconds apart would not.
    """
    device_key, gateway = generate_key(), Signer("gw-bench", generate_key())
    hw = HardwareConfig(driver="gpiozero", emergency_pin=BUTTON, bounce_s=0, camera="none")
    config = DeviceConfig.model_validate(
        {
            "device": {"id": DEVICE_ID, "state_dir": state},
            "gateway": {"id": gateway.kid, "public_key": public_key_to_b64(gateway.public_key)},
            "mqtt": {"host": broker.host, "port": broker.port, "heartbeat_s": 3600},
            # no resends during the run: each sample is one publish
            "outbox": {"resend_min_s": 3600, "resend_max_s": 3600},
            "hardware": hw,
        }
    )
    factory = MockFactory()
    hardware = build_hardware(hw, asyncio.get_running_loop(), pin_factory=factory)
    acked: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
    outbox = TimedOutbox(config.device.state_dir / "outbox.db")
    agent = Agent(
        config,
        signer=Signer(DEVICE_ID, device_key),
        gateway_key=gateway.public_key,
        hardware=hardware,
        outbox=outbox,
        observer=PublishTimer(acked),
    )
    pin = factory.pin(BUTTON)
    commits = outbox.commits
    result = Latencies()
    # the bare publish carries as many bytes as a signed alert
    result.payload_bytes = len(agent.link._sealed(Alert(bell="emergency", trigger="press"))[1])
    payload = os.urandom(result.payload_bytes)
    bare = await asyncio.to_thread(BarePaho, broker)
    session = Session(
        Settings(host=broker.host, port=broker.port, client_id="bench-session", persistent=False),
        lambda _message: None,
    )
    tasks = [asyncio.create_task(agent.run()), asyncio.create_task(session.run())]
    try:
        await asyncio.wait_for(agent.ready.wait(), STEP_TIMEOUT_S)
        await session.wait_connected(STEP_TIMEOUT_S)
        for i in range(samples + WARMUP):
            start = time.perf_counter()
            pin.drive_low()
            # asyncio.timeout, not wait_for: no extra task between the edge and the agent
            async with asyncio.timeout(STEP_TIMEOUT_S):
                done_at, message_id = await acked.get()
            pin.drive_high()  # a finger lets go tens of milliseconds later, not at once
            await asyncio.wait_for(agent.outbox_synced(), STEP_TIMEOUT_S)
            safe_at = time.perf_counter()
            # as the gateway would: received (out of the outbox), then closed (next incident)
            agent.outbox.received(message_id)
            for stage in ("received", "closed"):
                for effect in agent.behaviour.on_ack(Ack(ref=message_id, stage=stage)):
                    del effect  # patterns only; nothing to send
            bare_s = bare.publish(payload, i)  # blocks the loop: nothing else is going on
            begin = time.perf_counter()
            await asyncio.wait_for(session.publish(f"bench/session/{i % 10}", payload), 5)
            session_s = time.perf_counter() - begin
            if i >= WARMUP:
                result.press.append(done_at - start)
                result.commit.append(commits[-1])
                result.power_safe.append(safe_at - start)
                result.bare.append(bare_s)
                result.session.append(session_s)
    finally:
        await session.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(bare.close)
        factory.close()
        factory.reset()
    return result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def private_mb(pid: int) -> float:
    """Memory only this process holds (RSS minus pages shared with others, e.g. libpython)."""
    kb = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb / 1024


# The libraries the agent cannot run without, and nothing of ours: CPython with asyncio
# (which loads ssl), sqlite3, paho (without dnspython, as ansimi.mqtt loads it), Ed25519 from
# cryptography, and pydantic with one model built. Its RSS is the floor under any agent
# built on them, measured here so the agent's own share shows.
LIBRARY_FLOOR = """
import sys
sys.modules["dns"] = None
import asyncio, logging, sqlite3, ssl, tomllib
import paho.mqtt.client
del sys.modules["dns"]
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
import pydantic
class Model(pydantic.BaseModel):
    x: int
Ed25519PrivateKey.generate().sign(repr(Model(x=1)).encode())
print(open("/proc/self/status").read())
"""


def library_floor_mb() -> float:
    command = [sys.executable, "-c", LIBRARY_FLOOR]
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    line = next(row for row in done.stdout.splitlines() if row.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


async def agent_process(broker: Mosquitto, folder: Path) -> tuple[float, float, float]:
    """Spawn `ansimi device run`; seconds to `online` at the broker, then RSS and private
    memory in MB."""
    device_key, gateway = generate_key(), Signer("gw-bench", generate_key())
    folder.mkdir(parents=True, exist_ok=True)
    save_private_key(folder / "device.key", device_key)
    config = folder / "device.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE_ID}-proc"\nkey_file = "{folder}/device.key"\n'
        f'state_dir = "{folder}/state"\n'
        f'[gateway]\nid = "{gateway.kid}"\npublic_key = "{public_key_to_b64(gateway.public_key)}"\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        '[hardware]\ndriver = "fake"\ncamera = "none"\n'
    )
    online, alerted = asyncio.Event(), asyncio.Event()

    def on_message(raw: MqttMessage) -> None:
        verified = verify(raw.payload, lambda kid: device_key.public_key())
        message = parse_message(verified.payload)
        if message.type == "status":
            online.set()
        elif message.type == "alert":
            alerted.set()

    spy = Session(
        Settings(host=broker.host, port=broker.port, client_id="bench-spy", persistent=False),
        on_message,
    )
    spy_task = asyncio.create_task(spy.run())
    await spy.wait_connected(STEP_TIMEOUT_S)
    await spy.subscribe([(f"ansimi/v1/{DEVICE_ID}-proc/up/#", 1)])
    ansimi = Path(sys.executable).parent / "ansimi"
    start = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(ansimi),
        "device",
        "run",
        "--config",
        str(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.wait_for(online.wait(), STEP_TIMEOUT_S * 2)
        started = time.perf_counter() - start
        for _ in range(5):  # a few presses, so the alert path has run in it
            process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(0.05)
        await asyncio.wait_for(alerted.wait(), STEP_TIMEOUT_S)
        await asyncio.sleep(0.3)
        return started, rss_mb(process.pid), private_mb(process.pid)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)
        await spy.close()
        spy_task.cancel()
        await asyncio.gather(spy_task, return_exceptions=True)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ansimi-bench-device-") as tmp:
        folder = Path(tmp)
        with Mosquitto(MosquittoConfig(state_dir=folder / "broker", persistence=False)) as broker:
            runs = await press_and_publish_latencies(broker, folder / "agent", SAMPLES)
            started_s, rss, private = await agent_process(broker, folder / "process")
    floor = library_floor_mb()
    p50 = statistics.median
    figures = {
        "press_to_puback_p50_ms": round(p50(runs.press) * 1000, 3),
        "press_to_puback_p99_ms": round(percentile(runs.press, 0.99) * 1000, 3),
        "press_to_power_safe_p50_ms": round(p50(runs.power_safe) * 1000, 3),
        "agent_rss_mb": round(rss, 1),
        "agent_private_mb": round(private, 1),
        "start_to_connected_s": round(started_s, 3),
        "samples": len(runs.press),
        "outbox_commit_p50_ms": round(p50(runs.commit) * 1000, 3),
        "agent_rss_over_library_floor_mb": round(rss - floor, 1),
    }
    baseline = {
        "paho_publish_p50_ms": round(p50(runs.bare) * 1000, 3),
        "paho_publish_p99_ms": round(percentile(runs.bare, 0.99) * 1000, 3),
        "payload_bytes": runs.payload_bytes,
        "session_publish_p50_ms": round(p50(runs.session) * 1000, 3),
        "library_floor_rss_mb": round(floor, 1),
    }
    ratio = round(p50(runs.press) / p50(runs.bare), 2)
    print(f"python {platform.python_version()} on {platform.machine()}, {SAMPLES} rounds")
    print(
        f"press to PUBACK (agent)   p50 {figures['press_to_puback_p50_ms']:.3f} ms"
        f"  p99 {figures['press_to_puback_p99_ms']:.3f} ms"
    )
    print(
        f"bare paho publish QoS 1   p50 {baseline['paho_publish_p50_ms']:.3f} ms"
        f"  p99 {baseline['paho_publish_p99_ms']:.3f} ms  ({runs.payload_bytes} bytes)"
    )
    print(
        f"ansimi.mqtt.Session alone p50 {baseline['session_publish_p50_ms']:.3f} ms"
        "  (the agent's transport, on the event loop)"
    )
    print(f"ratio p50 (goal <= 2):    {ratio:.2f}")
    print(
        f"  within it, the outbox commit (written, before the publish) p50"
        f" {figures['outbox_commit_p50_ms']:.3f} ms; press to fsynced (power-cut safe,"
        f" overlapping the round trip) p50 {figures['press_to_power_safe_p50_ms']:.3f} ms"
    )
    print(
        f"agent RSS (goal <= 40 MB): {figures['agent_rss_mb']:.1f} MB"
        f"  (private to it: {figures['agent_private_mb']:.1f} MB)"
    )
    print(
        f"  the required libraries alone (python, asyncio+ssl, sqlite3, paho, cryptography,"
        f" pydantic): {floor:.1f} MB; the agent adds {rss - floor:.1f} MB"
    )
    print(f"start to connected (goal <= 1.5 s): {figures['start_to_connected_s']:.3f} s")
    print(
        json.dumps(
            {"bench": "device", "figures": figures, "baseline": baseline, "ratio": ratio},
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
