"""Alerts through the real gateway against raw MQTT on the same broker and client library.

One run, everything on loopback, each part in its own process as in production:
- a mosquitto on a free port;
- baseline: a bare paho subscriber and a bare paho publisher (QoS 1, 300-byte payloads):
  messages per second from first to last received;
- the gateway (`gateway.service.Gateway`: shared subscription, verify, replay checks,
  SQLite WAL with synchronous=FULL, signed `received` acks), with one central centre
  nobody listens at (a gateway must route every district): each alert gets its outbox row,
  the centre's circuit opens at once, so forwarding costs little and the figure is intake's;
- a load process with one MQTT connection per device (default 100), publishing alerts
  signed beforehand with valid sequence numbers and timestamps for registered devices,
  each device keeping a few alerts in flight; it times each alert from publish to its
  `received` ack (press-to-ack without the device's own signing, ~20 us).
It reports alerts/s, p50/p99 latency, and their ratio to the baseline. Then a heartbeat
phase: 10,000 more registered devices (default) each send one heartbeat within their real
interval (10 s), spread evenly over the load's connections; the gateway's CPU per heartbeat
and its CPU share are measured until a sentinel alert on every connection is acked (each
connection's messages arrive in order, so every heartbeat is kept by then).

The crypto floor: one Ed25519 verify and one sign with the library the gateway uses, timed
in this process (CPU time, one core) before and after the run. `crypto_floor_ratio` is that
floor over the gateway's CPU per message: for an alert verify + sign (its `received` ack),
for a heartbeat the verify alone (no ack). 1.0 would be a gateway that does nothing else.

Run: .venv/bin/python bench/gateway.py [--devices 100] [--alerts 30000] [--hb-devices 10000]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's own directory leads sys.path, and this file (named
# "gateway") would shadow the package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import orjson  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from nacl.bindings import crypto_sign_open  # noqa: E402

from ansimi.broker import Mosquitto, MosquittoConfig  # noqa: E402
from ansimi.mqtt import Message, Session, Settings  # noqa: E402
from protocol.clock import wall_ms  # noqa: E402
from protocol.envelope import open_for_device, seal  # noqa: E402
from protocol.jws import Signer  # noqa: E402
from protocol.keys import public_key_to_b64  # noqa: E402
from protocol.messages import AckMessage, Alert, Heartbeat, build_message  # noqa: E402
from protocol.topics import down_topic, up_topic  # noqa: E402

GATEWAY_ID = "gw-bench"
PAYLOAD_BYTES = 300
TIME_LIMIT_S = 25.0  # per phase: the whole run stays well under two minutes
PACED_S = 5.0  # the paced phase: latency when the gateway is not saturated
HEARTBEAT_INTERVAL_S = 10.0  # a bell's heartbeat interval (device.toml mqtt.heartbeat_s)
# before the heartbeats, the gateway with its whole fleet registered and nothing arriving:
# its background (supervision's ticks, the registry's reloads, the forwarder's retries)
IDLE_S = 5.0


def key_for(name: str) -> Ed25519PrivateKey:
    """Deterministic keys, so each process derives the same ones without passing secrets."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest())


def device_ids(n: int) -> list[str]:
    return [f"bell-{i:05d}" for i in range(n)]


def heartbeat_ids(n: int) -> list[str]:
    return [f"beat-{i:05d}" for i in range(n)]


def cpu_s(pid: int | None = None, *, main_thread: bool = False) -> float:
    """CPU seconds (user + system) of a process, from /proc; this one if None. All its
    threads, or with `main_thread` the one that runs the gateway's event loop."""
    where = f"/proc/{pid or 'self'}" + (f"/task/{pid or os.getpid()}" if main_thread else "")
    fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def verify_rate(seconds: float = 0.3) -> float:
    """Ed25519 verifications per second now: how fast this machine is while we measure.

    FIELD-NOTES has 16,000/s on an idle core of this kind of machine; a lower figure means
    neighbours are taking CPU, and every other figure of the run shrinks with it.
    """
    key = key_for("speed")
    public, data = key.public_key(), bytes(PAYLOAD_BYTES)
    signature = key.sign(data)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            public.verify(signature, data)
        n += 100
    return n / (time.perf_counter() - start)


def crypto_floor_us(seconds: float = 0.3) -> tuple[float, float, float]:
    """(verify, sign, OpenSSL's verify) in CPU microseconds with the gateway's Ed25519 calls
    (protocol/jws.py: libsodium's verify, `cryptography`'s sign): the work no gateway can
    skip per alert. CPU time, so a busy neighbour slows it like the gateway. OpenSSL's
    verify, which the gateway used before, for comparison."""
    key = key_for("floor")
    public, data = key.public_key(), bytes(PAYLOAD_BYTES)
    signature = key.sign(data)

    def per_call(fn: Callable[[], object]) -> float:
        n, start = 0, time.process_time()
        while time.process_time() - start < seconds:
            for _ in range(100):
                fn()
            n += 100
        return (time.process_time() - start) / n * 1e6

    return (
        per_call(lambda: crypto_sign_open(signature + data, public.public_bytes_raw())),
        per_call(lambda: key.sign(data)),
        per_call(lambda: public.verify(signature, data)),
    )


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---- baseline: bare paho ------------------------------------------------------------------
# The same MQTT stack as the gateway and the devices: paho driven from an asyncio loop
# (`ansimi.mqtt.Session`), one process publishing, one subscribing, nothing else.


async def _raw_sub(port: int, count: int) -> dict[str, Any]:
    got = 0
    first = last = 0.0
    done = asyncio.Event()

    def on_message(message: Message) -> None:
        nonlocal got, first, last
        last = time.perf_counter()
        if got == 0:
            first = last
        got += 1
        if got >= count:
            done.set()

    session = Session(Settings("127.0.0.1", port, "raw-sub", persistent=False), on_message)
    task = asyncio.create_task(session.run())
    await session.wait_connected(10)
    await session.subscribe([("bench/raw", 1)])
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIME_LIMIT_S)
    await session.close()
    task.cancel()
    return {"received": got, "msg_per_s": (got - 1) / max(last - first, 1e-9)}


def raw_subscriber(port: int, count: int) -> None:
    print(json.dumps(asyncio.run(_raw_sub(port, count))), flush=True)


async def _raw_pub(port: int, count: int) -> None:
    session = Session(Settings("127.0.0.1", port, "raw-pub", persistent=False), lambda m: None)
    task = asyncio.create_task(session.run())
    await session.wait_connected(10)
    payload = os.urandom(PAYLOAD_BYTES // 2).hex().encode()
    window = 1000  # QoS 1 messages awaiting their PUBACK at once
    async with asyncio.timeout(TIME_LIMIT_S):
        for start in range(0, count, window):
            n = min(window, count - start)
            await asyncio.gather(*(session.publish("bench/raw", payload) for _ in range(n)))
    await session.close()
    task.cancel()


def raw_publisher(port: int, count: int) -> None:
    asyncio.run(_raw_pub(port, count))


# ---- the gateway --------------------------------------------------------------------------


def prepare_gateway(
    state: Path, port: int, devices: list[str], mqtt_version: int, instances: int
) -> list[Path]:
    from gateway.store import Device, SqliteDatabase
    from protocol.keys import save_private_key

    state.mkdir(parents=True, exist_ok=True)
    save_private_key(state / "signing.key", key_for(GATEWAY_ID))
    store = SqliteDatabase(state / "gateway.db")
    # set-up only: ten thousand registrations need not wait for ten thousand fsyncs (the
    # gateway opens the file afterwards with its own synchronous=FULL)
    store._db.execute("PRAGMA synchronous=OFF")
    for device in devices:
        public = public_key_to_b64(key_for(device).public_key())
        store.add_device(Device(device, public, "bell", "mapo"), now_ms=0)
    store.close()
    configs = []
    # several instances: one gateway id, one database, a client id each, splitting the
    # uplink through the shared subscription
    for i in range(instances):
        config = state / f"gateway-{i}.toml"
        config.write_text(
            f'id = "{GATEWAY_ID}"\nsigning_key = "{state / "signing.key"}"\n'
            f'database = "{state / "gateway.db"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nversion = {mqtt_version}\n'
            f'client_id = "{GATEWAY_ID}-{i}"\n'
            # nobody listens on port 9 (discard) on loopback: the circuit opens at once
            '[[centres]]\nname = "central"\nurl = "http://127.0.0.1:9/events"\n'
            'secret = "bench-centre-secret-unused"\n'
        )
        configs.append(config)
    return configs


def run_gateway(config_path: Path, profile: Path | None, heartbeats_unread: bool) -> None:
    from ansimi.config import load_config
    from gateway.config import GatewayConfig
    from gateway.service import Gateway, settle_gc

    config = load_config(config_path, GatewayConfig)
    if heartbeats_unread:
        leave_heartbeats_unread(Gateway)

    async def main() -> None:
        gateway = Gateway(config)
        task = asyncio.create_task(gateway.run())
        await asyncio.wait_for(gateway.ready.wait(), 10)
        settle_gc()  # as `ansimi gateway run` does
        print("ready", flush=True)
        # the parent closes our stdin when the run is over
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    if profile is None:
        asyncio.run(main())
        return
    import cProfile

    # CPU time, not wall time: waiting in epoll is not cost, and neighbours' load is not ours
    profiler = cProfile.Profile(time.process_time)
    profiler.runctx("asyncio.run(main())", globals(), {"main": main})
    profiler.dump_stats(str(profile))


def leave_heartbeats_unread(gateway: Any) -> None:
    """The gateway as it is but for heartbeats, dropped as they reach it: still received and
    PUBACKed by its MQTT session, never verified nor kept. What a heartbeat costs it then is
    what the transport and the loop take before the intake; the intake could cost nothing
    and the heartbeat would still cost that."""
    take = gateway._on_message

    def on_message(self: Any, message: Any) -> None:
        if not message.topic.endswith("/heartbeat"):
            take(self, message)

    gateway._on_message = on_message


# ---- the devices --------------------------------------------------------------------------


def _ack_of(payload: bytes) -> tuple[str, str]:
    """(ref, stage) of an ack, read without verifying: see `run_load` for the sample that is."""
    body_b64 = payload.split(b".")[1]
    data = orjson.loads(base64.urlsafe_b64decode(body_b64 + b"=" * (-len(body_b64) % 4)))
    return data["body"]["ref"], data["body"]["stage"]


class Load:
    """Device connections with alerts signed beforehand, timing each alert to its ack."""

    def __init__(self, port: int, devices: list[str], per_device: int) -> None:
        self.port = port
        self.devices = devices
        self.gateway_key = key_for(GATEWAY_ID).public_key()
        # sign everything first: the device's own signing (~20 us) is not what is measured
        now = wall_ms()
        self.tokens: dict[str, list[tuple[str, bytes]]] = {}
        for device in devices:
            signer = Signer(device, key_for(device))
            queue = []
            for seq in range(1, per_device + 1):
                msg = build_message(
                    Alert(bell="emergency", trigger="press"), device=device, seq=seq, ts=now
                )
                queue.append((msg.id, seal(msg, signer).encode()))
            self.tokens[device] = queue
        self.cursor = dict.fromkeys(devices, 0)
        self.sessions: dict[str, Session] = {}
        self.sent_at: dict[str, float] = {}
        self.latencies: list[float] = []
        self.verified = 0
        self.expected = 0
        self.done = asyncio.Event()
        self.closed_loop = False
        self.limit = per_device  # alerts a device may have sent by the end of this phase

    async def connect(self) -> list[asyncio.Task[None]]:
        tasks = []
        for device in self.devices:
            # MQTT 3.1.1 on the load side only: it spares the load process paho's v5
            # property objects (CPU it would take from the gateway on two shared cores); the
            # gateway's own connection is set apart (--gateway-mqtt), the broker translates
            settings = Settings("127.0.0.1", self.port, device, version=311, persistent=False)
            self.sessions[device] = Session(settings, self._handler(device))
            tasks.append(asyncio.create_task(self.sessions[device].run()))
        for session in self.sessions.values():
            await session.wait_connected(10)
        await asyncio.gather(
            *(s.subscribe([(down_topic(d, "ack"), 1)]) for d, s in self.sessions.items())
        )
        return tasks

    def send_next(self, device: str) -> bool:
        i = self.cursor[device]
        if i >= self.limit:
            return False
        self.cursor[device] = i + 1
        alert_id, token = self.tokens[device][i]
        self.sent_at[alert_id] = time.perf_counter()
        self.sessions[device].publish(up_topic(device, "alert"), token)
        return True

    def _handler(self, device: str) -> Callable[[Message], None]:
        def handle(message: Message) -> None:
            ref, stage = _ack_of(message.payload)
            sent = self.sent_at.pop(ref, None) if stage == "received" else None
            if sent is None:
                return
            self.latencies.append(time.perf_counter() - sent)
            if self.verified < 200:  # a sample is checked as the device would, signature too
                keys = {GATEWAY_ID: self.gateway_key}
                opened = open_for_device(message.payload, keys.__getitem__, device)
                assert isinstance(opened.message, AckMessage)
                self.verified += 1
            if len(self.latencies) >= self.expected:
                self.done.set()
            if self.closed_loop:
                self.send_next(device)

        return handle

    def _phase_result(self, elapsed: float, cpu: float) -> dict[str, Any]:
        latencies = sorted(self.latencies)
        return {
            "acked": len(latencies),
            "sent": self.expected,
            "seconds": elapsed,
            "alerts_per_s": len(latencies) / elapsed,
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
            "load_cpu_s": cpu,
        }

    async def saturate(self, per_device: int, window: int) -> dict[str, Any]:
        """Closed loop: each device keeps `window` alerts in flight, sending on each ack."""
        self.latencies, self.done, self.closed_loop = [], asyncio.Event(), True
        self.expected = len(self.devices) * per_device
        self.limit = per_device
        start, cpu = time.perf_counter(), cpu_s()
        for device in self.devices:
            for _ in range(window):
                self.send_next(device)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), TIME_LIMIT_S)
        return self._phase_result(time.perf_counter() - start, cpu_s() - cpu)

    async def paced(self, rate: float, seconds: float) -> dict[str, Any]:
        """Open loop: alerts at a steady `rate`, round robin over the devices."""
        self.latencies, self.done, self.closed_loop = [], asyncio.Event(), False
        self.expected = int(rate * seconds)
        self.limit = len(next(iter(self.tokens.values())))
        start, cpu = time.perf_counter(), cpu_s()
        sent = 0
        while sent < self.expected:
            due = min(self.expected, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                self.send_next(self.devices[sent % len(self.devices)])
                sent += 1
            await asyncio.sleep(0.002)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), 10)
        result = self._phase_result(time.perf_counter() - start, cpu_s() - cpu)
        result["rate"] = rate
        return result

    async def heartbeats(self, tokens: list[tuple[str, bytes]], interval_s: float) -> float:
        """Each (device, token) once within `interval_s`, evenly paced, spread over the
        connections (the bench's broker has no ACL); then one sentinel alert per connection,
        after its heartbeats: once every sentinel is acked, every heartbeat has been kept.
        Returns the seconds from the first heartbeat to the last sentinel's ack."""
        sessions = list(self.sessions.values())
        rate = len(tokens) / interval_s
        self.latencies, self.done, self.closed_loop = [], asyncio.Event(), False
        start, sent = time.perf_counter(), 0
        while sent < len(tokens):
            due = min(len(tokens), int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                device, token = tokens[sent]
                sessions[sent % len(sessions)].publish(up_topic(device, "heartbeat"), token)
                sent += 1
            await asyncio.sleep(0.002)
        self.expected = len(self.devices)
        self.limit = len(next(iter(self.tokens.values())))
        for device in self.devices:
            self.send_next(device)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.done.wait(), 30)
        if len(self.latencies) < self.expected:
            raise SystemExit("heartbeat phase: the sentinel alerts were not all acked")
        return time.perf_counter() - start


def sealed_heartbeats(devices: list[str]) -> list[tuple[str, bytes]]:
    """One signed heartbeat per device, as an agent sends it (seq 1, the time now)."""
    now = wall_ms()
    beat = Heartbeat(uptime_s=3600, power="mains", link_quality=80, firmware="bench")
    return [
        (d, seal(build_message(beat, device=d, seq=1, ts=now), Signer(d, key_for(d))).encode())
        for d in devices
    ]


async def _load(
    port: int,
    devices: list[str],
    per_device: int,
    window: int,
    rate: float,
    paced_s: float,
    beat_devices: list[str],
) -> dict[str, Any]:
    # enough for the paced phase at up to 10,000/s or the given rate, and the sentinels
    paced_per_device = int(max(rate, 10_000) * paced_s) // len(devices) + 2
    load = Load(port, devices, per_device + paced_per_device)
    beats = sealed_heartbeats(beat_devices)
    tasks = await load.connect()
    print("ready", flush=True)
    result = await load.saturate(per_device, window)
    print("saturated", flush=True)
    # let the last of the saturating phase drain, so that it does not count in the next
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while load.sent_at:  # noqa: ASYNC110 - the ack handlers empty it; a poll is enough
                await asyncio.sleep(0.05)
    load.sent_at.clear()
    # what an alert waits when the gateway is not the bottleneck: by default at half the
    # rate it just sustained
    result["paced"] = await load.paced(rate or result["alerts_per_s"] / 2, paced_s)
    result["acks_verified"] = load.verified
    if beats:
        load.sent_at.clear()
        print("idle", flush=True)
        await asyncio.sleep(IDLE_S)
        print("idle-done", flush=True)
        print("heartbeats", flush=True)
        result["heartbeat_s"] = await load.heartbeats(beats, HEARTBEAT_INTERVAL_S)
        print("heartbeats-done", flush=True)
        result["heartbeats"] = len(beats)
    for session in load.sessions.values():
        await session.close()
    for task in tasks:
        task.cancel()
    return result


def run_load(
    port: int,
    n_devices: int,
    per_device: int,
    window: int,
    rate: float,
    paced_s: float,
    n_beats: int,
) -> None:
    result = asyncio.run(
        _load(
            port,
            device_ids(n_devices),
            per_device,
            window,
            rate,
            paced_s,
            heartbeat_ids(n_beats),
        )
    )
    print(json.dumps(result), flush=True)


# ---- orchestration --------------------------------------------------------------------------


def _child(*args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdout=subprocess.PIPE,
        stdin=stdin,
        text=True,
    )


def _last_json(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout_s)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"child {proc.args!r} printed no result (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _wait_ready(proc: subprocess.Popen[str], word: str = "ready") -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != word:
        proc.kill()
        raise SystemExit(f"child {proc.args!r} did not start: {line!r}")


def baseline(port: int, count: int) -> dict[str, Any]:
    sub = _child("--role", "raw-sub", "--port", str(port), "--count", str(count))
    _wait_ready(sub)
    pub = _child("--role", "raw-pub", "--port", str(port), "--count", str(count))
    result = _last_json(sub, TIME_LIMIT_S + 10)
    pub.wait(TIME_LIMIT_S)
    return result


def through_gateway(
    state: Path,
    broker: Mosquitto,
    n_devices: int,
    per_device: int,
    window: int,
    profile: Path | None,
    heartbeats_unread: bool,
    mqtt_version: int,
    rate: float,
    n_beats: int,
    instances: int,
) -> dict[str, Any]:
    port = broker.port
    devices = device_ids(n_devices) + heartbeat_ids(n_beats)
    gateways = []
    for i, config in enumerate(prepare_gateway(state, port, devices, mqtt_version, instances)):
        args = ["--role", "gateway", "--config", str(config)]
        if profile is not None and i == 0:
            args += ["--profile", str(profile)]
        if heartbeats_unread:
            args.append("--heartbeats-unread")
        gateways.append(_child(*args, stdin=subprocess.PIPE))
    try:
        for gateway in gateways:
            _wait_ready(gateway)
        assert broker.process is not None
        gateway_pids = [g.pid for g in gateways]
        pids = broker.process.pid, *gateway_pids
        load = _child(
            "--role",
            "load",
            "--port",
            str(port),
            "--devices",
            str(n_devices),
            "--count",
            str(per_device),
            "--window",
            str(window),
            "--rate",
            str(rate),
            "--hb-devices",
            str(n_beats),
        )
        # the load says when the saturating phase starts and ends: CPU is counted in between
        _wait_ready(load)
        before = [cpu_s(pid) for pid in pids]
        loop_before = sum(cpu_s(pid, main_thread=True) for pid in gateway_pids)
        _wait_ready(load, "saturated")
        after = [cpu_s(pid) for pid in pids]
        loop_cpu = sum(cpu_s(pid, main_thread=True) for pid in gateway_pids) - loop_before
        beats_cpu = idle_cpu = idle_s = 0.0
        if n_beats:
            _wait_ready(load, "idle")
            idle_before, idle_began = sum(cpu_s(pid) for pid in gateway_pids), time.monotonic()
            _wait_ready(load, "idle-done")
            idle_cpu = sum(cpu_s(pid) for pid in gateway_pids) - idle_before
            idle_s = time.monotonic() - idle_began
            _wait_ready(load, "heartbeats")
            beats_before = sum(cpu_s(pid) for pid in gateway_pids)
            _wait_ready(load, "heartbeats-done")
            beats_cpu = sum(cpu_s(pid) for pid in gateway_pids) - beats_before
        result = _last_json(load, TIME_LIMIT_S + 30)
        result["broker_cpu_s"] = after[0] - before[0]
        result["gateway_cpu_s"] = sum(after[1:]) - sum(before[1:])  # all instances
        result["gateway_loop_cpu_s"] = loop_cpu
        result["heartbeat_gateway_cpu_s"] = beats_cpu
        result["idle_gateway_cpu_share"] = idle_cpu / idle_s if idle_s else 0.0
        return result
    finally:
        for gateway in gateways:
            assert gateway.stdin is not None
            gateway.stdin.close()
        for gateway in gateways:
            try:
                gateway.wait(15)
            except subprocess.TimeoutExpired:
                gateway.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--role", default="main")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--alerts", type=int, default=30_000, help="through the gateway")
    parser.add_argument("--raw", type=int, default=100_000, help="baseline messages")
    parser.add_argument("--window", type=int, default=2, help="alerts in flight per device")
    parser.add_argument(
        "--rate",
        type=float,
        default=0,
        help="alerts/s of the paced phase (default: half the saturated rate)",
    )
    parser.add_argument(
        "--hb-devices",
        type=int,
        default=10_000,
        help="devices of the heartbeat phase, one heartbeat each in 10 s (0: no such phase)",
    )
    parser.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway processes splitting the uplink (shared subscription, one database)",
    )
    parser.add_argument("--config", type=Path)
    parser.add_argument("--profile", type=Path, help="cProfile the gateway into this file")
    parser.add_argument(
        "--heartbeats-unread",
        action="store_true",
        help="the gateway drops heartbeats before its intake: the heartbeat phase then"
        " measures its MQTT session and loop alone, the part no intake change can save",
    )
    parser.add_argument(
        "--nagle", action="store_true", help="leave mosquitto's default: Nagle on its sockets"
    )
    parser.add_argument(
        "--gateway-mqtt",
        type=int,
        choices=(5, 311),
        default=5,
        help="the gateway's MQTT version (its shared subscription works with both)",
    )
    args = parser.parse_args()
    if args.role == "raw-sub":
        return raw_subscriber(args.port, args.count)
    if args.role == "raw-pub":
        return raw_publisher(args.port, args.count)
    if args.role == "gateway":
        return run_gateway(args.config, args.profile, args.heartbeats_unread)
    if args.role == "load":
        return run_load(
            args.port, args.devices, args.count, args.window, args.rate, PACED_S, args.hb_devices
        )

    per_device = max(1, args.alerts // args.devices)
    speed_before = verify_rate()
    floor_before = crypto_floor_us()
    with tempfile.TemporaryDirectory(prefix="ansimi-bench-") as tmp:
        state = Path(tmp)
        broker = Mosquitto(
            MosquittoConfig(
                state_dir=state / "broker",
                persistence=False,
                # mosquitto leaves Nagle on by default: a small ack then waits for the
                # device's delayed ACK, ~40 ms on Linux (measured here: paced p50 43 ms with
                # it, 6 ms without); --nagle measures the default
                extra_lines=[] if args.nagle else ["set_tcp_nodelay true"],
            )
        )
        broker.start()
        try:
            raw = baseline(broker.port, args.raw)
            print(f"baseline: {raw}", file=sys.stderr)
            gw = through_gateway(
                state / "gateway",
                broker,
                args.devices,
                per_device,
                args.window,
                args.profile,
                args.heartbeats_unread,
                args.gateway_mqtt,
                args.rate,
                args.hb_devices,
                args.gateways,
            )
        finally:
            broker.stop()
    speed = (speed_before + verify_rate()) / 2
    floor_after = crypto_floor_us()
    verify_us, sign_us, openssl_verify_us = (
        (b + a) / 2 for b, a in zip(floor_before, floor_after, strict=True)
    )
    ratio = gw["alerts_per_s"] / raw["msg_per_s"]
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    print(
        f"machine speed now: {speed:,.0f} Ed25519 verify/s on one core "
        f"(FIELD-NOTES: 16,000 when idle; lower means busy neighbours)"
    )
    print(f"mosquitto set_tcp_nodelay: {'false (its default)' if args.nagle else 'true'}")
    print(
        f"baseline: paho QoS 1, {PAYLOAD_BYTES}-byte payloads, 1 publisher -> 1 subscriber: "
        f"{raw['msg_per_s']:,.0f} msg/s ({raw['received']:,} messages)"
    )
    print(
        f"gateway x{args.gateways} (MQTT {args.gateway_mqtt}, 1 unreachable centre): "
        f"{args.devices} devices, "
        f"{args.window} alerts in flight each: {gw['alerts_per_s']:,.0f} alerts/s "
        f"({gw['acked']:,}/{gw['sent']:,} acked in {gw['seconds']:.1f} s)"
    )
    print(
        f"press-to-ack latency: p50 {gw['p50_ms']:.1f} ms, p99 {gw['p99_ms']:.1f} ms, "
        f"max {gw['max_ms']:.1f} ms; {gw['acks_verified']} acks signature-checked"
    )
    paced = gw.get("paced")
    if paced:
        print(
            f"paced at {paced['rate']:,.0f} alerts/s: {paced['acked']:,}/{paced['sent']:,} acked, "
            f"p50 {paced['p50_ms']:.1f} ms, p99 {paced['p99_ms']:.1f} ms, "
            f"max {paced['max_ms']:.1f} ms"
        )
    per_alert = {
        k: gw[f"{k}_cpu_s"] / max(gw["acked"], 1) * 1e6
        for k in ("gateway", "gateway_loop", "load", "broker")
    }
    print(
        "CPU per alert: gateway {gateway:.0f} us (its event loop's thread {gateway_loop:.0f} us:"
        " MQTT, checks, signing; the rest mostly the store's thread, its commits), load"
        " {load:.0f} us, broker {broker:.0f} us"
        " (2 cores: {budget:.0f} us of CPU per alert at 5,000/s)".format(**per_alert, budget=400)
    )
    alert_floor_ratio = (verify_us + sign_us) / max(per_alert["gateway"], 1e-9)
    print(
        f"crypto floor (CPU on one core): verify {verify_us:.1f} us (libsodium; OpenSSL "
        f"{openssl_verify_us:.1f} us), sign {sign_us:.1f} us; "
        f"alert: {verify_us + sign_us:.0f} / {per_alert['gateway']:.0f}"
        f" us = crypto_floor_ratio {alert_floor_ratio:.2f} (goal >= 0.5)"
    )
    beats = gw.get("heartbeats", 0)
    beat_us = gw["heartbeat_gateway_cpu_s"] / beats * 1e6 if beats else float("nan")
    # the same, less what the gateway spent over as long a time with nothing arriving
    idle_share = gw["idle_gateway_cpu_share"]
    net_beat_us = beat_us - idle_share * gw.get("heartbeat_s", 0) / beats * 1e6 if beats else 0
    unread = args.heartbeats_unread

    def beat_ratio(cost_us: float) -> float:
        # unread, the verify was not made: the best ratio an intake costing nothing beyond
        # its verify could reach over this transport (a ceiling)
        return verify_us / (verify_us + cost_us if unread else cost_us) if beats else float("nan")

    beat_floor_ratio, beyond_idle_ratio = beat_ratio(beat_us), beat_ratio(net_beat_us)
    if beats:
        share = gw["heartbeat_gateway_cpu_s"] / gw["heartbeat_s"]
        print(
            f"heartbeats{' left unread' if unread else ''}: {beats:,} devices,"
            f" one each in {HEARTBEAT_INTERVAL_S:.0f} s: gateway {beat_us:.0f} us each, {share:.0%}"
            f" of a core over {gw['heartbeat_s']:.1f} s (with {args.devices} sentinel alerts); "
            + (
                "an intake that cost only its verify would make the ratio at most "
                f"{beat_floor_ratio:.2f}"
                if unread
                else f"crypto_floor_ratio {beat_floor_ratio:.2f} (goal >= 0.5)"
            )
        )
        print(
            f"  of which the gateway's background with this fleet and nothing arriving:"
            f" {idle_share:.1%} of a core ({beat_us - net_beat_us:.0f} us a heartbeat);"
            f" beyond it {net_beat_us:.0f} us a heartbeat, and the ratio"
            f"{' at most' if unread else ''} {beyond_idle_ratio:.2f}"
        )
    print(f"ratio (goal >= 0.5, 5,000 alerts/s, p99 <= 50 ms): {ratio:.3f}")
    # What the ratio goal leaves the gateway on this machine: the load and the broker share
    # its cores, so at half the baseline's rate every alert may cost all three together at
    # most cores / rate of CPU. A budget below the crypto floor cannot be met by any gateway.
    goal_rate = 0.5 * raw["msg_per_s"]
    cores = len(os.sched_getaffinity(0))  # those this run may use, not all the machine's
    budget_us = cores * 1e6 / goal_rate - per_alert["load"] - per_alert["broker"]
    print(
        f"ratio 0.5 here is {goal_rate:,.0f} alerts/s: {cores} cores leave"
        f" {cores * 1e6 / goal_rate:.0f} us of CPU per alert for all three;"
        f" less the load's and the broker's, the gateway's budget is {budget_us:.0f} us per"
        f" alert against its crypto floor of {verify_us + sign_us:.0f} us"
    )
    print(
        json.dumps(
            {
                "bench": "gateway",
                "figures": {
                    "alerts_per_s": round(gw["alerts_per_s"]),
                    "p50_ms": round(gw["p50_ms"], 2),
                    "p99_ms": round(gw["p99_ms"], 2),
                    "max_ms": round(gw["max_ms"], 2),
                    "acked": gw["acked"],
                    "sent": gw["sent"],
                    "devices": args.devices,
                    "in_flight_per_device": args.window,
                    "centres": 1,
                    "gateway_mqtt": args.gateway_mqtt,
                    "gateways": args.gateways,
                    "broker_tcp_nodelay": not args.nagle,
                    "paced": paced
                    and {
                        k: round(paced[k], 2)
                        for k in ("rate", "acked", "sent", "p50_ms", "p99_ms", "max_ms")
                    },
                    "gateway_cpu_us_per_alert": round(per_alert["gateway"]),
                    "gateway_loop_cpu_us_per_alert": round(per_alert["gateway_loop"]),
                    "load_cpu_us_per_alert": round(per_alert["load"]),
                    "broker_cpu_us_per_alert": round(per_alert["broker"]),
                },
                "baseline": {
                    "msg_per_s": round(raw["msg_per_s"]),
                    "messages": raw["received"],
                    "payload_bytes": PAYLOAD_BYTES,
                    "qos": 1,
                },
                "ratio": round(ratio, 3),
                "ratio_goal_gateway_budget_us": round(budget_us),
                "crypto_floor": {
                    "verify_us": round(verify_us, 1),
                    "sign_us": round(sign_us, 1),
                    "openssl_verify_us": round(openssl_verify_us, 1),
                    "alert_ratio": round(alert_floor_ratio, 3),
                    # with heartbeats unread, the verify was not made: no ratio, a ceiling
                    "heartbeat_ratio": round(beat_floor_ratio, 3) if beats and not unread else None,
                    "heartbeat_ratio_ceiling": round(beat_floor_ratio, 3)
                    if beats and unread
                    else None,
                    # both beyond the gateway's background (`heartbeats.idle_cpu_share`)
                    "heartbeat_ratio_beyond_idle": round(beyond_idle_ratio, 3)
                    if beats and not unread
                    else None,
                    "heartbeat_ratio_ceiling_beyond_idle": round(beyond_idle_ratio, 3)
                    if beats and unread
                    else None,
                },
                "heartbeats": beats
                and {
                    "devices": beats,
                    "interval_s": HEARTBEAT_INTERVAL_S,
                    "gateway_cpu_us_per_heartbeat": round(beat_us),
                    "gateway_cpu_share": round(share, 3),
                    "idle_cpu_share": round(idle_share, 4),
                    "cpu_us_per_heartbeat_beyond_idle": round(net_beat_us),
                    "unread": unread,
                },
                "machine_verify_per_s": round(speed),
            }
        )
    )


if __name__ == "__main__":
    main()
