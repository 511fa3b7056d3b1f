"""How many real agents this machine holds, each sending a heartbeat every 10 s.

Phase 1, the figures: `--agents` device agents (the real `device.agent.Agent` on fake
hardware, in-memory outboxes) in simulator worker processes, connected to a mosquitto of
our own; a counter subscribed to every heartbeat topic. Phase 2, the baseline: the same
number of bare MQTT sessions (`ansimi.mqtt.Session`, paho on the event loop, the agent's
own transport) publishing an unsigned heartbeat at the same rate, in the same number of
processes. The ratio is CPU per agent over CPU per bare session: what the agent costs
on top of holding its connection.

Per phase: devices held (the fewest connected during the hold), CPU of the device
processes (in % of one core) and of mosquitto, RSS per device (the processes' whole RSS
divided by the devices, interpreter included), heartbeats sent and counted, and lost
(sent by a connected device, never counted by the subscriber).

Bounded: each phase ramps at `--rate` connections a second, then holds `--hold` seconds;
a ramp that stalls is cut at its deadline. Under three minutes in all at the defaults.

Run: .venv/bin/python bench/fleet.py [--agents 10000]   (last line: one JSON object)

The fleet-operations figures of issue 18 are benches of their own: bench/rollout.py (time
to update 1,000 devices at 10 % steps) and bench/fleet_tests.py (the gateway's CPU for
10,000 devices' weekly test presses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, this file's folder leads sys.path, and bench/protocol.py would shadow
# the `protocol` package; the repository root goes there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from ansimi.broker import Mosquitto, MosquittoConfig  # noqa: E402
from ansimi.mqtt import Session, Settings  # noqa: E402
from protocol.keys import generate_key, public_key_to_b64  # noqa: E402
from simulator.limits import raise_open_files  # noqa: E402
from simulator.messages import (  # noqa: E402
    COMMAND,
    WORKER_LINE,
    Command,
    Member,
    Progress,
    Result,
    Start,
    Stop,
    Up,
    WorkerSpec,
    encode,
)
from simulator.scenario import DeviceSettings  # noqa: E402

# each agent process: a socket per agent plus the interpreter's own; stays well under 20k
PER_PROCESS = 2500
TICK_S = 0.5
RUN_LIMIT_S = 170.0
STOP_S = 15.0
RAMP_BATCH = 25  # devices started per pause: a per-device sleep drifts on a busy loop
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return 0.0


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return 0


@dataclass
class Child:
    process: asyncio.subprocess.Process
    size: int
    connected: int = 0
    heartbeats: int = 0
    by_device: dict[str, int] = field(default_factory=dict)  # heartbeats sent, per device
    up: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        try:
            while raw := await self.process.stdout.readline():
                line = WORKER_LINE.validate_json(raw)
                if isinstance(line, Up):
                    self.connected = line.connected
                    self.up.set()
                elif isinstance(line, Progress):
                    self.connected = line.connected
                    self.heartbeats = line.heartbeats
                else:
                    self.by_device = line.heartbeats
        finally:
            self.up.set()
            self.done.set()

    async def send(self, command: Command) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.process.stdin.write(encode(command))
            await self.process.stdin.drain()


class Counter:
    """Counts heartbeats as the broker hands them out."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self.by_device: dict[str, int] = {}
        self.session = Session(
            Settings(host="127.0.0.1", port=port, client_id="bench-counter", persistent=False),
            self._on_message,
        )

    def _on_message(self, message: Any) -> None:
        self.count += 1
        parts = message.topic.split("/")  # ansimi/v1/{device}/up/heartbeat, bench/{device}/...
        device = parts[1] if parts[0] == "bench" else parts[2]
        self.by_device[device] = self.by_device.get(device, 0) + 1


async def phase(
    name: str,
    args: argparse.Namespace,
    broker: Mosquitto,
    counter: Counter,
    state: Path,
    hold_s: float,
) -> dict[str, Any]:
    processes = max(1, math.ceil(args.agents / PER_PROCESS))
    sizes = [
        args.agents // processes + (1 if i < args.agents % processes else 0)
        for i in range(processes)
    ]
    rate = args.rate / processes  # each process ramps its share at once
    children: list[Child] = []
    gateway_key = public_key_to_b64(generate_key().public_key())
    offset = 0
    for i, size in enumerate(sizes):
        if name == "agents":
            spec = WorkerSpec(
                broker_host=broker.host,
                broker_port=broker.port,
                gateway_id="gw-bench",
                gateway_public_key=gateway_key,
                run_secret="bench",
                seed=1,
                state_dir=state / "devices",
                outbox_in_memory=True,
                # the device's own defaults, but for the heartbeat and the ramp
                device=DeviceSettings(
                    heartbeat_s=args.heartbeat, hold_repeat_s=1.0, connect_rate=rate
                ),
                devices=[Member(f"bench-{offset + n:05d}", "bell", "mapo") for n in range(size)],
                connect_timeout_s=args.agents / args.rate + 30,
            )
            path = state / f"{name}-{i}.json"
            path.write_text(spec.model_dump_json())
            command = [sys.executable, "-m", "simulator.worker", str(path)]
        else:
            command = [
                sys.executable,
                __file__,
                "--baseline-worker",
                str(size),
                str(offset),
                str(broker.port),
                str(args.heartbeat),
                str(rate),
            ]
        offset += size
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=(state / f"{name}-{i}.log").open("ab"),
            limit=16 * 1024 * 1024,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        child = Child(process, size)
        children.append(child)
        asyncio.get_running_loop().create_task(child.read())
    ramp_deadline = time.monotonic() + args.agents / args.rate + 30
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(1.0, ramp_deadline - time.monotonic())):
            for child in children:
                await child.up.wait()
    ramp_s = time.monotonic() - (ramp_deadline - args.agents / args.rate - 30)
    at_up = sum(c.connected for c in children)
    print(f"{name}: {at_up} connected after {ramp_s:.1f} s", flush=True)
    for child in children:
        await child.send(Start(at=time.time()))
    await asyncio.sleep(args.heartbeat)  # one interval so every device has sent once
    pids = [c.process.pid for c in children]
    cpu0 = sum(cpu_seconds(p) for p in pids)
    broker_cpu0 = cpu_seconds(broker.process.pid) if broker.process else 0.0
    t0 = time.monotonic()
    held = args.agents
    while time.monotonic() - t0 < hold_s:
        await asyncio.sleep(TICK_S)
        held = min(held, sum(c.connected for c in children))
    elapsed = time.monotonic() - t0
    cpu = (sum(cpu_seconds(p) for p in pids) - cpu0) / elapsed
    broker_cpu = (
        (cpu_seconds(broker.process.pid) if broker.process else 0.0) - broker_cpu0
    ) / elapsed
    rss = sum(rss_bytes(p) for p in pids)
    broker_rss = rss_bytes(broker.process.pid) if broker.process else 0
    for child in children:
        await child.send(Stop())
    # all children stop together, within one bound; whoever is still busy is killed
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STOP_S):
            await asyncio.gather(*(c.done.wait() for c in children))
            await asyncio.gather(*(c.process.wait() for c in children))
    for child in children:
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()
    sent = sum(c.heartbeats for c in children)
    # the last heartbeats may still be on their way through the broker
    settle = time.monotonic() + 5
    while counter.count < sent and time.monotonic() < settle:  # noqa: ASYNC110 (a counter)
        await asyncio.sleep(0.1)
    received = counter.count
    # per device: a QoS 1 heartbeat resent after a reconnect is counted twice by the
    # subscriber, and must not hide another device's lost one
    sent_by = {d: n for c in children for d, n in c.by_device.items()}
    lost = sum(max(0, n - counter.by_device.get(d, 0)) for d, n in sent_by.items())
    counter.count = 0
    counter.by_device = {}
    return {
        "devices": args.agents,
        "held": held,
        "processes": processes,
        "ramp_s": round(ramp_s, 1),
        "connected_after_ramp": at_up,
        "cpu_pct_of_one_core": round(cpu * 100, 1),
        "broker_cpu_pct": round(broker_cpu * 100, 1),
        "rss_mb": round(rss / 2**20, 1),
        "rss_kb_per_device": round(rss / 1024 / max(held, 1), 1),
        "broker_rss_kb_per_connection": round(broker_rss / 1024 / max(held, 1), 1),
        "heartbeats_sent": sent,
        "heartbeats_counted": received,
        "heartbeats_lost": lost if sent_by else max(0, sent - received),
    }


async def bench(args: argparse.Namespace) -> None:
    limit = raise_open_files()  # mosquitto, our child, inherits it
    print(f"open files limit {limit}; {os.cpu_count()} cores; {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="ansimi-fleet-") as tmp:
        state = Path(tmp)
        broker = Mosquitto(MosquittoConfig(state_dir=state / "broker", persistence=False))
        broker.start()
        counter = Counter(broker.port)
        runner = asyncio.create_task(counter.session.run())
        try:
            await counter.session.wait_connected(10)
            await counter.session.subscribe(
                [("ansimi/v1/+/up/heartbeat", 0), ("bench/+/heartbeat", 0)]
            )
            started = time.monotonic()
            figures = await phase("agents", args, broker, counter, state, args.hold)
            print(f"agents:   {json.dumps(figures)}")
            # the whole run stays under three minutes: the baseline's hold gives way if needed
            left = RUN_LIMIT_S - (time.monotonic() - started) - figures["ramp_s"] - args.heartbeat
            baseline = await phase(
                "baseline", args, broker, counter, state, max(5.0, min(args.hold, left - 20))
            )
            print(f"baseline: {json.dumps(baseline)}")
        finally:
            await counter.session.close()
            runner.cancel()
            broker.stop()
    per_agent = figures["cpu_pct_of_one_core"] / max(figures["held"], 1)
    per_bare = baseline["cpu_pct_of_one_core"] / max(baseline["held"], 1)
    ratio = round(per_agent / per_bare, 2) if per_bare else None
    print(
        f"agents held {figures['held']}/{args.agents}; CPU {figures['cpu_pct_of_one_core']} % "
        f"of a core; {figures['rss_kb_per_device']} KB per agent; "
        f"{figures['heartbeats_lost']} heartbeats lost; CPU per agent {ratio}x a bare session"
    )
    print(json.dumps({"bench": "fleet", "figures": figures, "baseline": baseline, "ratio": ratio}))


# ---- the baseline's worker: bare sessions, no agent -----------------------------------------


async def baseline_worker(count: int, offset: int, port: int, every_s: float, rate: float) -> None:
    raise_open_files()
    sessions: list[Session] = []
    tasks: list[asyncio.Task[None]] = []
    sent = 0
    payload = b"x" * 300  # about a signed heartbeat's size

    by_device: dict[str, int] = {}

    # the same lines as the agents' workers (simulator.messages), so one reader serves both
    def emit(line: Up | Progress | Result) -> None:
        sys.stdout.buffer.write(encode(line))
        sys.stdout.flush()

    def connected() -> int:
        return sum(1 for s in sessions if s.connected)

    async def beat(session: Session, topic: str) -> None:
        nonlocal sent
        while True:
            await asyncio.sleep(every_s)
            if session.connected:
                session.publish(topic, payload)
                sent += 1
                device = topic.split("/")[1]
                by_device[device] = by_device.get(device, 0) + 1

    for n in range(count):
        device = f"bare-{offset + n:05d}"
        session = Session(Settings(host="127.0.0.1", port=port, client_id=device), lambda m: None)
        sessions.append(session)
        tasks.append(asyncio.create_task(session.run()))
        tasks.append(asyncio.create_task(beat(session, f"bench/{device}/heartbeat")))
        if n % RAMP_BATCH == RAMP_BATCH - 1:
            await asyncio.sleep(RAMP_BATCH / rate)
    deadline = time.monotonic() + 30
    # polled: each session knows whether it is connected; there is no fleet-wide event
    while sum(1 for s in sessions if s.connected) < count and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    emit(Up(connected=connected(), total=count))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def report() -> None:
        while True:
            await asyncio.sleep(TICK_S)
            emit(Progress(at=time.time(), connected=connected(), heartbeats=sent))

    reporter = asyncio.create_task(report())
    while raw := await reader.readline():
        if isinstance(COMMAND.validate_json(raw), Stop):
            break
    reporter.cancel()
    for task in tasks[1::2]:
        task.cancel()
    emit(Progress(at=time.time(), connected=connected(), heartbeats=sent))
    emit(Result(availability={}, outbox={}, heartbeats=by_device))
    for session in sessions:
        await session.close()
    for task in tasks:
        task.cancel()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline-worker":
        count, offset, port, every, rate = sys.argv[2:7]
        asyncio.run(baseline_worker(int(count), int(offset), int(port), float(every), float(rate)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--hold", type=float, default=20.0, help="seconds measured per phase")
    parser.add_argument("--rate", type=float, default=500.0, help="connections per second")
    args = parser.parse_args()
    if not 1 <= args.agents <= 20_000 or not 1 <= args.hold <= 60:
        parser.error("--agents 1..20000 and --hold 1..60 keep the run bounded")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
