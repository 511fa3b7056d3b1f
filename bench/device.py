"""Device agent: press to PUBACK against a bare paho publish, RSS, start to connected.

- press to PUBACK: a fake pin edge (gpiozero MockFactory, the real gpiozero adapter) through
  the bridge to the loop, the behaviour, the outbox commit (SQLite, synchronous=FULL), the
  signature and the QoS 1 publish, until the broker's PUBACK. Baseline: a bare paho client
  publishing a payload of the same size at QoS 1 and waiting for its PUBACK, on the same
  broker in the same run. The ratio is p50 over p50 (goal <= 2).
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
from protocol.jws import Signer, verify  # noqa: E402
from protocol.keys import generate_key, public_key_to_b64, save_private_key  # noqa: E402
from protocol.messages import Ack, parse_message  # noqa: E402

SAMPLES = 200
WARMUP = 10
STEP_TIMEOUT_S = 5.0
DEVICE_ID = "bell-bench"
BUTTON = 17


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bare_paho(broker: Mosquitto, payload: bytes, samples: int) -> list[float]:
    """Publish-to-PUBACK latencies (s) of a plain paho client with its own network thread."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=paho.MQTTv5)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise RuntimeError("bare paho client did not connect")
            time.sleep(0.01)
        times: list[float] = []
        for i in range(samples + WARMUP):
            start = time.perf_counter()
            info = client.publish(f"bench/bare/{i % 10}", payload, qos=1)
            info.wait_for_publish(STEP_TIMEOUT_S)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        return times
    finally:
        client.loop_stop()
        client.disconnect()


async def agent_press_to_puback(
    broker: Mosquitto, state: Path, samples: int
) -> tuple[list[float], list[float], int]:
    """Pin edge to PUBACK latencies (s) of the agent's alerts, the outbox commit within
    each (s), and the alert token size.

    The agent must commit (SQLite WAL, synchronous=FULL: an fsync) before it publishes; a
    bare publish commits nothing. The commit is timed inside each sample, so the part of
    the ratio that is durability rather than code shows on a disk shared with others.
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
    agent = Agent(
        config,
        signer=Signer(DEVICE_ID, device_key),
        gateway_key=gateway.public_key,
        hardware=hardware,
    )
    pin = factory.pin(BUTTON)
    acked: asyncio.Queue[tuple[float, str, int]] = asyncio.Queue()
    send = agent.link.send

    def timed_send(body, *, message_id=None, **options):  # type: ignore[no-untyped-def]
        future = send(body, message_id=message_id, **options)
        if message_id is not None:
            future.add_done_callback(
                lambda f: acked.put_nowait((time.perf_counter(), message_id, 0))
            )
        return future

    agent.link.send = timed_send  # type: ignore[method-assign]
    put = agent.outbox.put
    commits: list[float] = []

    def timed_put(*args, **kwargs):  # type: ignore[no-untyped-def]
        begin = time.perf_counter()
        put(*args, **kwargs)
        commits.append(time.perf_counter() - begin)

    agent.outbox.put = timed_put  # type: ignore[method-assign]
    task = asyncio.create_task(agent.run())
    times: list[float] = []
    commit_times: list[float] = []
    try:
        await asyncio.wait_for(agent.ready.wait(), STEP_TIMEOUT_S)
        for i in range(samples + WARMUP):
            start = time.perf_counter()
            pin.drive_low()
            pin.drive_high()
            done_at, message_id, _ = await asyncio.wait_for(acked.get(), STEP_TIMEOUT_S)
            if i >= WARMUP:
                times.append(done_at - start)
                commit_times.append(commits[-1])
            # as the gateway would: received (out of the outbox), then closed (next incident)
            agent.outbox.received(message_id)
            for stage in ("received", "closed"):
                for effect in agent.behaviour.on_ack(Ack(ref=message_id, stage=stage)):
                    del effect  # patterns only; nothing to send
        token_size = len(agent.link._sealed(agent.heartbeat())[1])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        factory.close()
        factory.reset()
    return times, commit_times, token_size


async def session_publish(broker: Mosquitto, payload: bytes, samples: int) -> list[float]:
    """Publish-to-PUBACK through `ansimi.mqtt.Session` alone: the agent's transport, on the
    event loop, without the agent. Splits the ratio into transport and agent."""
    session = Session(
        Settings(host=broker.host, port=broker.port, client_id="bench-session", persistent=False),
        lambda _message: None,
    )
    task = asyncio.create_task(session.run())
    times: list[float] = []
    try:
        await session.wait_connected(STEP_TIMEOUT_S)
        for i in range(samples + WARMUP):
            start = time.perf_counter()
            await asyncio.wait_for(session.publish(f"bench/session/{i % 10}", payload), 5)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
    finally:
        await session.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return times


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
            agent_times, commit_times, token_size = await agent_press_to_puback(
                broker, folder / "agent", SAMPLES
            )
            payload = os.urandom(token_size)
            bare_times = await asyncio.to_thread(bare_paho, broker, payload, SAMPLES)
            session_times = await session_publish(broker, payload, SAMPLES)
            started_s, rss, private = await agent_process(broker, folder / "process")
    commit_p50 = statistics.median(commit_times)
    figures = {
        "press_to_puback_p50_ms": round(statistics.median(agent_times) * 1000, 3),
        "press_to_puback_p99_ms": round(percentile(agent_times, 0.99) * 1000, 3),
        "agent_rss_mb": round(rss, 1),
        "agent_private_mb": round(private, 1),
        "start_to_connected_s": round(started_s, 3),
        "samples": len(agent_times),
        "outbox_commit_p50_ms": round(commit_p50 * 1000, 3),
    }
    baseline = {
        "paho_publish_p50_ms": round(statistics.median(bare_times) * 1000, 3),
        "paho_publish_p99_ms": round(percentile(bare_times, 0.99) * 1000, 3),
        "payload_bytes": token_size,
        "session_publish_p50_ms": round(statistics.median(session_times) * 1000, 3),
    }
    ratio = round(figures["press_to_puback_p50_ms"] / baseline["paho_publish_p50_ms"], 2)
    without = statistics.median(t - c for t, c in zip(agent_times, commit_times, strict=True))
    without_commit = without / statistics.median(bare_times)
    figures["ratio_without_commit"] = round(without_commit, 2)
    print(f"python {platform.python_version()} on {platform.machine()}, {SAMPLES} samples each")
    print(
        f"press to PUBACK (agent)   p50 {figures['press_to_puback_p50_ms']:.3f} ms"
        f"  p99 {figures['press_to_puback_p99_ms']:.3f} ms"
    )
    print(
        f"bare paho publish QoS 1   p50 {baseline['paho_publish_p50_ms']:.3f} ms"
        f"  p99 {baseline['paho_publish_p99_ms']:.3f} ms  ({token_size} bytes)"
    )
    print(
        f"ansimi.mqtt.Session alone p50 {baseline['session_publish_p50_ms']:.3f} ms"
        "  (the agent's transport, on the event loop)"
    )
    print(f"ratio p50 (goal <= 2):    {ratio:.2f}")
    print(
        f"  of which the outbox commit (fsync) p50: {figures['outbox_commit_p50_ms']:.3f} ms;"
        f" without it the ratio would be {without_commit:.2f}"
    )
    print(
        f"agent RSS (goal <= 40 MB): {figures['agent_rss_mb']:.1f} MB"
        f"  (private to it: {figures['agent_private_mb']:.1f} MB)"
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
