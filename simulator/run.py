"""One simulator run: broker, gateway process, centre sink, proxy, worker processes, faults.

The gateway runs as its own process (`ansimi gateway run`), as in the field, so a SIGKILL
is a real crash. The broker is mosquitto (`ansimi.broker`). The centre sink and the TCP
proxy live in this process on its event loop; the agents live in worker processes.

Every wait is bounded: start-up by `connect_timeout_s`, the scenario by its duration, the
drain by `drain_s`, shutdown by fixed timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ansimi.broker import Mosquitto, MosquittoConfig, free_port
from ansimi.privacy import create_key_file
from ansimi.tomlwrite import render_toml
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64, save_private_key
from simulator import identities
from simulator.disks import TmpDisk
from simulator.errors import SimulatorError
from simulator.limits import raise_open_files
from simulator.messages import (
    WORKER_LINE,
    Command,
    Cut,
    Damage,
    Heal,
    LinkDeadSeen,
    Member,
    Performed,
    Press,
    Progress,
    Result,
    Skew,
    Start,
    Step,
    Stop,
    Up,
    UpdateSpec,
    VideoSeen,
    WorkerSpec,
    encode,
)
from simulator.proxy import FaultProxy
from simulator.rollouts import Cli, ReleaseSeen, ReleaseSite, RolloutDriver
from simulator.scenario import (
    PROXIED,
    BrokerRestart,
    CentreDown,
    ClockSkew,
    DeviceDiskFull,
    GatewayDiskFull,
    GatewayKill,
    Latency,
    OutboxDamage,
    Partition,
    Plan,
    Scenario,
    plan,
)
from simulator.sink import Sink

log = logging.getLogger(__name__)

GATEWAY_ID = "gw-sim"
DEVICES_PER_WORKER = 2500
# lines from a worker can carry thousands of sends at once
WORKER_LINE_LIMIT = 64 * 1024 * 1024


class SimError(SimulatorError):
    """The run could not be set up (broker, gateway or workers did not come up)."""


@dataclass(slots=True)
class Record:
    """One message a device sent that needs the centre: an alert or a cancel."""

    id: str
    device: str
    type: str
    trigger: str
    sent_at: float
    acks: dict[str, float] = field(default_factory=dict)  # stage -> first seen on the device


@dataclass(slots=True)
class Mark:
    """Something the simulator did to the system, for the report's timeline."""

    at: float
    label: str
    until: float | None = None


@dataclass
class Observed:
    """Everything measured during a run; `simulator.report` turns it into figures."""

    scenario: Scenario
    plan: Plan
    t0: float = 0.0
    end: float = 0.0
    records: dict[str, Record] = field(default_factory=dict)
    marks: list[Mark] = field(default_factory=list)
    connected: list[tuple[float, int]] = field(default_factory=list)  # (wall time, total)
    reconnect_s: list[float] = field(default_factory=list)  # per broker restart
    availability: dict[str, float] = field(default_factory=dict)
    outbox_left: dict[str, int] = field(default_factory=dict)
    heartbeats: int = 0
    resends: int = 0
    actions: int = 0
    agent_errors: int = 0
    rejected_downlink: int = 0
    sink: Sink | None = None
    skewed: dict[str, float] = field(default_factory=dict)  # device -> skew applied (s)
    partitions: list[tuple[float, float, list[str]]] = field(default_factory=list)
    # agents the simulator stopped (outbox damage): (from, until, devices), wall clock
    stops: list[tuple[float, float, list[str]]] = field(default_factory=list)
    # alerts waiting in an outbox the simulator destroyed: not lost by the system under test
    at_risk: set[str] = field(default_factory=set)
    # [device, action, wall time] of every action a worker did
    performed: list[Performed] = field(default_factory=list)
    # (from, until, [device]): a device's link down, as the device saw it
    gaps: list[tuple[float, float, list[str]]] = field(default_factory=list)
    links_lost: int = 0  # connections the proxy reset for a lossy link
    gateway_exit: int | None = None  # the gateway ended on its own (not by a fault): its code
    workers_failed: int = 0  # worker processes that never reported their result
    not_ready: int = 0  # agents that never became ready (connected and subscribed)
    # doorbell streams: [session, device, offered at, connected at, emergency sent at]
    video: list[VideoSeen] = field(default_factory=list)
    sms: dict[str, float] = field(default_factory=dict)  # alert id -> its SMS went out
    sms_sent: int = 0  # every SMS the fake modems sent
    video_datagrams: int = 0  # the doorbells' WebRTC datagrams through the imposed link
    video_dropped: int = 0  # ...and those it dropped
    # presses on a cut link: (device, pressed at, link declared dead at or None if never)
    link_dead: list[LinkDeadSeen] = field(default_factory=list)
    # agent rollouts ([rollout]): each release as the gateway told it, then what the bells
    # ran at the end, those left midway through an update, and the agents' restarts
    rollouts: list[ReleaseSeen] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    updating_left: list[str] = field(default_factory=list)
    restarts: int = 0


class _WorkerProc:
    def __init__(self, process: asyncio.subprocess.Process, size: int) -> None:
        self.process = process
        self.size = size
        self.connected = 0
        self.last_at = 0.0  # when its latest counts were taken (wall clock)
        self.heartbeats = 0
        self.resends = 0
        self.actions = 0
        self.errors = 0
        self.updating = 0  # its bells with an update under way
        self.up = asyncio.Event()
        self.result: Result | None = None
        self.finished = asyncio.Event()

    async def send(self, command: Command) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.process.stdin.write(encode(command))
            await self.process.stdin.drain()


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        report_dir: Path,
        *,
        on_tick: Callable[[Simulation], None] | None = None,
        broker: tuple[str, int] | None = None,
    ) -> None:
        """`broker`: an MQTT broker already running (plain TCP, anonymous) instead of ours."""
        if broker is not None and any(f.type == "broker_restart" for f in scenario.faults):
            raise SimError(
                f"{scenario.name} restarts the broker, which needs the simulator's own: "
                "run it without --broker"
            )
        self.scenario = scenario
        self.report_dir = report_dir
        self.state = report_dir / "state"
        self.on_tick = on_tick
        self.plan = plan(scenario)
        self.observed = Observed(scenario, self.plan)
        self.secret = secrets.token_urlsafe(24)
        self.operator_token = secrets.token_urlsafe(24)
        self.run_secret = identities.new_run_secret()
        self.broker: Mosquitto | None = None
        self.broker_addr: tuple[str, int] = broker or ("127.0.0.1", 0)
        self._own_broker = broker is None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.proxy: FaultProxy | None = None
        self.sink: Sink | None = None
        self.workers: list[_WorkerProc] = []
        self.api_port = 0
        self.phase = "starting"
        self._background: set[asyncio.Task[Any]] = set()
        self._faults: list[asyncio.Task[Any]] = []
        self._owner: dict[str, int] = {}  # device -> index of the worker running it
        self._http: aiohttp.ClientSession | None = None
        # small disks the disk-full faults fill: the gateway's database, some bells' state
        self.gateway_disk: TmpDisk | None = None
        self.device_disk: TmpDisk | None = None
        self.database = self.state / "gateway" / "gateway.db"
        # agent rollouts: the run's release site, and who rolls its releases out
        self.release_site: ReleaseSite | None = None
        self.rollout_driver: RolloutDriver | None = None
        self._rollout_task: asyncio.Task[None] | None = None

    # ---- counts for the live display --------------------------------------------------------

    @property
    def connected(self) -> int:
        return sum(w.connected for w in self.workers)

    def at_sink(self) -> int:
        assert self.sink is not None
        return sum(1 for r in self.observed.records if r in self.sink.arrivals)

    def received(self) -> int:
        return sum(1 for r in self.observed.records.values() if "received" in r.acks)

    # ---- set-up -----------------------------------------------------------------------------

    async def execute(self) -> Observed:
        if self.state.exists():
            shutil.rmtree(self.state)
        (self.state / "gateway").mkdir(parents=True)
        gateway_key = generate_key()
        save_private_key(self.state / "gateway" / "signing.key", gateway_key)
        self.gateway_public = public_key_to_b64(Signer(GATEWAY_ID, gateway_key).public_key)
        try:
            self._mount_disks()
            identities.register(self.database, self.plan.devices, self.run_secret)
        except BaseException:
            self._unmount_disks()  # a mount must not outlive a run that never started
            raise
        raise_open_files()  # before mosquitto starts: it inherits the limit
        if self._own_broker:
            self.broker = Mosquitto(
                MosquittoConfig(
                    state_dir=self.state / "broker",
                    autosave_interval_s=self.scenario.broker.autosave_interval_s,
                )
            )
            await asyncio.to_thread(self.broker.start)
            self.broker_addr = (self.broker.host, self.broker.port)
        self.sink = Sink(self.secret, self.state / "centre.db")
        self.observed.sink = self.sink
        await self.sink.start()
        self.sink.receiver.listeners.append(self._on_centre_event)
        self._http = aiohttp.ClientSession()
        try:
            self.api_port = free_port()
            await self._prepare_releases()
            (self.state / "gateway.toml").write_text(self._gateway_toml())
            await self._start_gateway()
            if self.rollout_driver is not None:
                await self.rollout_driver.add_releases()
            if self.scenario.needs_proxy:
                self.proxy = FaultProxy(*self.broker_addr, rng=random.Random(self.scenario.seed))
                await self.proxy.start()
            await self._start_workers()
            await self._run()
        finally:
            await self._teardown()
        return self.observed

    async def _prepare_releases(self) -> None:
        """[rollout]: the release key and the bundles, made as an installer makes them."""
        plan = self.scenario.rollout
        if plan is None:
            return
        assert self._http is not None
        cli = Cli(_child_env(), self.state / "provision.log")
        self.release_site = ReleaseSite(self.state / "release-site", cli)
        await self.release_site.prepare(plan)
        token_file = self.state / "gateway" / "admin.token"
        RolloutDriver.write_token(token_file, secrets.token_urlsafe(24))
        self.rollout_driver = RolloutDriver(
            plan,
            self.release_site,
            self._http,
            f"http://127.0.0.1:{self.api_port}",
            token_file,
            press=self._press,
            presses_since=self._presses_since,
            seed=self.scenario.seed,
        )

    def _mount_disks(self) -> None:
        """Before anything writes there: the disk-full faults' small disks, mounted."""
        for fault in self.scenario.faults:
            if isinstance(fault, GatewayDiskFull) and self.gateway_disk is None:
                disk = TmpDisk(self.state / "gateway-disk", fault.disk_mb)
                disk.mount()
                self.gateway_disk = disk
                self.database = disk.path / "gateway.db"
            elif isinstance(fault, DeviceDiskFull) and self.device_disk is None:
                disk = TmpDisk(self.state / "device-disk", fault.disk_mb)
                disk.mount()
                self.device_disk = disk

    def _unmount_disks(self) -> None:
        """After everyone stopped: keep the gateway's database for the report, then unmount."""
        if self.gateway_disk is not None and self.gateway_disk.mounted:
            self.gateway_disk.free()
            for path in self.gateway_disk.path.glob("gateway.db*"):
                with contextlib.suppress(OSError):
                    shutil.copy2(path, self.state / "gateway" / path.name)
        for disk in (self.gateway_disk, self.device_disk):
            if disk is not None:
                try:
                    disk.unmount()
                except Exception:
                    log.exception("simulator: cannot unmount %s", disk.path)

    def _data_key(self) -> Path:
        """The run's own data key (0600), made once: without one the gateway records no
        video (gateway/video/hub.py), and the run's recordings are part of what it checks."""
        path = self.state / "gateway" / "privacy.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            create_key_file(path)
        return path

    def _gateway_toml(self) -> str:
        assert self.sink is not None
        host, port = self.broker_addr
        g = self.scenario.gateway
        tokens = [{"name": "sim-operator", "role": "operator", "token": self.operator_token}]
        config = {
            "id": GATEWAY_ID,
            "signing_key": self.state / "gateway" / "signing.key",
            "database": self.database,
            "mqtt": {"host": host, "port": port},
            "forward": {
                "backoff_min_s": g.forward_backoff_min_s,
                "backoff_max_s": g.forward_backoff_max_s,
                "breaker_failures": g.breaker_failures,
                "breaker_open_s": g.breaker_open_s,
            },
            "video": {
                "enabled": self.scenario.video.enabled,
                "loopback_candidates": True,
                "recordings_dir": self.state / "recordings",
            },
            # the data key: video is personal data, recorded only encrypted under it
            "privacy": {"key_file": self._data_key()},
            "supervise": {
                "heartbeat_s": self.scenario.device.heartbeat_s,
                "missed": g.missed,
                "will_grace_s": g.will_grace_s,
            },
            "api": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": self.api_port,
                "tokens": tokens,
            },
            "centres": [
                {"name": "central", "url": self.sink.url, "secret": self.secret, "districts": ["*"]}
            ],
        }
        plan, driver, site = self.scenario.rollout, self.rollout_driver, self.release_site
        if plan is not None and driver is not None and site is not None:
            config["updates"] = {
                "release_public_key": site.public_key,
                "dir": self.state / "gateway" / "releases",
                "public_url": f"http://127.0.0.1:{self.api_port}",
                "pause_failed_pct": plan.pause_failed_pct,
                "reoffer_s": plan.reoffer_s,
            }
            installer = {
                "name": "sim-installer",
                "role": "admin",
                "token_file": str(driver.token_file),
            }
            tokens.append(installer)
        return render_toml(
            config,
            header=["written by `ansimi sim run`"],
            comments={"video": "off unless the scenario streams: aiortc is then not even imported"},
        )

    async def _start_gateway(self) -> None:
        self.gateway = self._spawn_gateway()
        await self._gateway_healthy(30)

    def _spawn_gateway(self) -> subprocess.Popen[bytes]:
        log_file = (self.state / "gateway.log").open("ab")
        try:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ansimi_edge",
                    "gateway",
                    "run",
                    "--config",
                    str(self.state / "gateway.toml"),
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )
        finally:
            log_file.close()

    async def _gateway_healthy(self, timeout_s: float) -> None:
        assert self._http is not None and self.gateway is not None
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.api_port}/healthz"
        while time.monotonic() < deadline:
            if self.gateway.poll() is not None:
                raise SimError(
                    f"the gateway exited (code {self.gateway.returncode}): "
                    f"see {self.state / 'gateway.log'}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise SimError(
            f"the gateway was not healthy in {timeout_s:g}s: see {self.state / 'gateway.log'}"
        )

    def _worker_count(self) -> int:
        if self.scenario.workers is not None:
            return self.scenario.workers
        # one loop holds a few thousand agents; the bound is file descriptors: a socket and
        # an outbox's three SQLite files per agent, under a 20,000 limit per process
        return max(1, math.ceil(len(self.plan.devices) / DEVICES_PER_WORKER))

    async def _start_workers(self) -> None:
        count = min(self._worker_count(), len(self.plan.devices))
        shares: list[list[Member]] = [[] for _ in range(count)]
        owner: dict[str, int] = {}
        for n, d in enumerate(self.plan.devices):
            shares[n % count].append(Member(d.id, d.kind, d.district))
            owner[d.id] = n % count
        self._owner = owner
        steps: list[list[Step]] = [[] for _ in range(count)]
        for s in self.plan.steps:
            steps[owner[s.device]].append(Step(s.at, s.device, s.action, s.after_s, s.restore_s))
        skews: list[list[Skew]] = [[] for _ in range(count)]
        for index, fault in enumerate(self.scenario.faults):
            if isinstance(fault, ClockSkew):
                targets = self.plan.targets.get(index, [])
                for w in range(count):
                    mine = [t for t in targets if owner[t] == w]
                    skews[w].append(
                        Skew(self.scenario.scaled(fault.at_s), mine, int(fault.skew_s * 1000))
                    )
                for t in targets:
                    self.observed.skewed[t] = fault.skew_s
        # only the devices a network fault touches go through the proxy: the others keep a
        # direct path, so a broker restart measures the agents, not the proxy
        proxied = {
            t
            for i, f in enumerate(self.scenario.faults)
            if f.type in PROXIED
            for t in self.plan.targets.get(i, [])
        }
        # the bells whose disk fills up keep their state on the small disk
        small_disk = {
            t
            for i, f in enumerate(self.scenario.faults)
            if isinstance(f, DeviceDiskFull)
            for t in self.plan.targets.get(i, [])
        }
        n = len(self.plan.devices)
        connect_timeout = 20 + 2 * n / self.scenario.device.connect_rate
        for w in range(count):
            spec = WorkerSpec(
                broker_host=self.broker_addr[0],
                broker_port=self.broker_addr[1],
                proxy_port=self.proxy.port if self.proxy else None,
                proxied=[d.device_id for d in shares[w] if d.device_id in proxied],
                mqtt_version=5,
                gateway_id=GATEWAY_ID,
                gateway_public_key=self.gateway_public,
                run_secret=self.run_secret,
                seed=self.scenario.seed,
                state_dir=self.state / "devices",
                small_disk_dir=self.device_disk.path if self.device_disk else None,
                small_disk_devices=[d.device_id for d in shares[w] if d.device_id in small_disk],
                device=self.scenario.device,
                devices=shares[w],
                steps=steps[w],
                skews=skews[w],
                connect_timeout_s=connect_timeout,
                video=self.scenario.video,
                updates=self._update_spec(),
            )
            path = self.state / f"worker-{w}.json"
            path.write_text(spec.model_dump_json())
            log_file = (self.state / f"worker-{w}.log").open("ab")
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "simulator.worker",
                    str(path),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log_file,
                    env=_child_env(),
                    limit=WORKER_LINE_LIMIT,
                )
            finally:
                log_file.close()
            proc = _WorkerProc(process, len(shares[w]))
            self.workers.append(proc)
            self._spawn(self._read_worker(proc))
        try:
            async with asyncio.timeout(connect_timeout + 20):
                for proc in self.workers:
                    await proc.up.wait()
        except TimeoutError:
            raise SimError("worker processes did not report in time: see worker-*.log") from None

    def _update_spec(self) -> UpdateSpec | None:
        plan, site = self.scenario.rollout, self.release_site
        if plan is None or site is None:
            return None
        return UpdateSpec(
            release_public_key=site.public_key, installed=plan.installed, trial_s=plan.trial_s
        )

    # ---- running ----------------------------------------------------------------------------

    async def _run(self) -> None:
        o = self.observed
        s = self.scenario
        o.t0 = time.time() + 0.5
        for proc in self.workers:
            await proc.send(Start(at=o.t0))
        self._faults = [self._spawn(self._fault(i, f)) for i, f in enumerate(s.faults)]
        if self.rollout_driver is not None and s.rollout is not None:
            self._rollout_task = self._spawn(self._roll_out(self.rollout_driver, s.rollout.start_s))
        self.phase = "scenario"
        end = o.t0 + s.scaled(s.duration_s)
        while time.time() < end:
            self._tick()
            await asyncio.sleep(0.25)
        self.phase = "drain"
        drain_end = time.time() + s.drain_s
        while time.time() < drain_end and not self._settled():
            self._tick()
            await asyncio.sleep(0.25)
        o.end = time.time()
        if self.gateway is not None:
            o.gateway_exit = self.gateway.poll()
        self.phase = "stopping"
        for proc in self.workers:
            await proc.send(Stop())
        # all workers stop together within one bound; teardown kills whoever is still busy
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.gather(*(p.finished.wait() for p in self.workers))
        for proc in self.workers:
            if proc.result is not None:
                o.availability.update(proc.result.availability)
                o.outbox_left.update(proc.result.outbox)
                o.rejected_downlink += proc.result.rejected
                o.video += proc.result.video
                o.not_ready += proc.result.not_ready
                o.sms_sent += proc.result.sms_sent
                o.video_datagrams += proc.result.video_datagrams
                o.video_dropped += proc.result.video_dropped
                o.versions.update(proc.result.versions)
                o.updating_left += proc.result.updating
                o.restarts += proc.result.restarts
        o.heartbeats = sum(w.heartbeats for w in self.workers)
        o.resends = sum(w.resends for w in self.workers)
        o.actions = sum(w.actions for w in self.workers)
        o.agent_errors = sum(w.errors for w in self.workers)
        o.links_lost = self.proxy.lost if self.proxy is not None else 0
        o.workers_failed = sum(1 for w in self.workers if w.result is None)
        self._tick()

    def _settled(self) -> bool:
        """Every alert at the centre, every fault over, and (if operators ack) every ack seen."""
        assert self.sink is not None
        if any(not t.done() for t in self._faults):
            return False
        if self._rollout_task is not None and not self._rollout_task.done():
            return False
        if any(w.updating for w in self.workers):
            return False  # a bell midway through an update (committing, rolling back)
        for record in self.observed.records.values():
            if record.id not in self.sink.arrivals or "received" not in record.acks:
                return False
            if (
                self.scenario.operator.ack_after_s is not None
                and record.type == "alert"
                and "acknowledged" not in record.acks
            ):
                return False
        return self.connected == len(self.plan.devices)

    def _tick(self) -> None:
        self.observed.connected.append((time.time(), self.connected))
        if self.on_tick is not None:
            self.on_tick(self)

    async def _read_worker(self, proc: _WorkerProc) -> None:
        assert proc.process.stdout is not None
        records = self.observed.records
        try:
            while raw := await proc.process.stdout.readline():
                line = WORKER_LINE.validate_json(raw)
                if isinstance(line, Up):
                    proc.connected = line.connected
                    proc.up.set()
                elif isinstance(line, Progress):
                    proc.connected = line.connected
                    proc.last_at = line.at
                    proc.heartbeats = line.heartbeats
                    proc.resends = line.resends
                    proc.actions = line.actions
                    proc.errors = line.errors
                    proc.updating = line.updating
                    for sent in line.sent:
                        records[sent.message_id] = Record(*sent)
                    self.observed.at_risk.update(line.at_risk)
                    self.observed.performed += line.performed
                    self.observed.gaps += [(g.since, g.until, [g.device_id]) for g in line.gaps]
                    for ack in line.acks:
                        record = records.get(ack.ref)
                        if record is not None and ack.stage not in record.acks:
                            record.acks[ack.stage] = ack.at
                    for sms in line.sms:
                        self.observed.sms.setdefault(sms.alert_id, sms.at)
                    self.observed.link_dead += line.link_dead
                else:
                    proc.result = line
        finally:
            proc.up.set()  # a worker that died must not keep start-up waiting
            proc.finished.set()

    # ---- faults -----------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _at(self, seconds: float) -> float:
        when = self.observed.t0 + self.scenario.scaled(seconds)
        await asyncio.sleep(max(0.0, when - time.time()))
        return time.time()

    async def _fault(self, index: int, fault: Any) -> None:
        s = self.scenario
        o = self.observed
        targets = set(self.plan.targets.get(index, []))
        if isinstance(fault, BrokerRestart):
            assert self.broker is not None
            start = await self._at(fault.at_s)
            await asyncio.to_thread(self.broker.kill if fault.kill else self.broker.stop)
            await asyncio.sleep(s.scaled(fault.down_s))
            await asyncio.to_thread(self.broker.start)
            up = time.time()
            o.marks.append(Mark(start, "broker " + ("killed" if fault.kill else "stopped"), up))
            await self._measure_reconnect(up)
        elif isinstance(fault, GatewayKill):
            assert self.gateway is not None
            start = await self._at(fault.at_s)
            self.gateway.kill()
            await asyncio.to_thread(self.gateway.wait, 10)
            await asyncio.sleep(s.scaled(fault.down_s))
            await self._start_gateway()
            o.marks.append(Mark(start, "gateway SIGKILL", time.time()))
        elif isinstance(fault, Partition):
            assert self.proxy is not None
            start = await self._at(fault.at_s)
            (self.proxy.drop if fault.mode == "drop" else self.proxy.hold)(targets)
            await self._tell_owners(lambda mine: Cut(device_ids=mine), targets)
            await self._at(fault.at_s + fault.duration_s)
            self.proxy.heal(targets)
            await self._tell_owners(lambda mine: Heal(device_ids=mine), targets)
            label = f"partition ({fault.mode}) of {len(targets)} devices"
            o.marks.append(Mark(start, label, time.time()))
            o.partitions.append((start, time.time(), sorted(targets)))
        elif isinstance(fault, Latency):
            assert self.proxy is not None
            start = await self._at(fault.at_s)
            self.proxy.delay(targets, fault.delay_ms / 1000)
            self.proxy.lose(targets, fault.loss)
            await self._at(fault.at_s + fault.duration_s)
            self.proxy.delay(targets, 0)
            self.proxy.lose(targets, 0)
            label = f"+{fault.delay_ms:g} ms, loss {fault.loss:g} on {len(targets)}"
            o.marks.append(Mark(start, label, time.time()))
        elif isinstance(fault, CentreDown):
            assert self.sink is not None
            start = await self._at(fault.at_s)
            await self.sink.go_down(fault.mode)
            await self._at(fault.at_s + fault.duration_s)
            await self.sink.come_back()
            o.marks.append(Mark(start, f"centre down ({fault.mode})", time.time()))
        elif isinstance(fault, ClockSkew):
            start = await self._at(fault.at_s)
            o.marks.append(Mark(start, f"clock {fault.skew_s:+g}s on {len(targets)}"))
        elif isinstance(fault, GatewayDiskFull | DeviceDiskFull):
            disk = self.gateway_disk if isinstance(fault, GatewayDiskFull) else self.device_disk
            assert disk is not None
            free_kb = fault.free_kb if isinstance(fault, GatewayDiskFull) else 0
            start = await self._at(fault.at_s)
            await asyncio.to_thread(disk.fill, free_kb)
            await self._at(fault.at_s + fault.duration_s)
            disk.free()
            whose = "gateway" if isinstance(fault, GatewayDiskFull) else f"{len(targets)} bells'"
            o.marks.append(Mark(start, f"{whose} disk full", time.time()))
        elif isinstance(fault, OutboxDamage):
            start = await self._at(fault.at_s)
            down = s.scaled(fault.down_s)
            await self._tell_owners(
                lambda mine: Damage(mode=fault.mode, down_s=down, device_ids=mine), targets
            )
            await asyncio.sleep(down)
            done = {"delete": "deleted", "corrupt": "corrupted", "restart": "kept"}[fault.mode]
            label = f"outbox {done} on {len(targets)}, agents stopped"
            o.marks.append(Mark(start, label, time.time()))
            o.stops.append((start, time.time(), sorted(targets)))

    async def _roll_out(self, driver: RolloutDriver, start_s: float) -> None:
        start = await self._at(start_s)
        self.observed.rollouts = driver.seen
        await driver.run()
        versions = ", ".join(f"{r.version} {r.state}" for r in driver.seen)
        self.observed.marks.append(Mark(start, f"rollouts: {versions}", time.time()))

    def _presses_since(self, since: float, devices: Collection[str]) -> int:
        return sum(
            1
            for device, action, at in self.observed.performed
            if at >= since and action == "press" and device in devices
        )

    async def _press(self, devices: list[str]) -> None:
        await self._tell_owners(lambda mine: Press(device_ids=mine), set(devices))

    async def _tell_owners(
        self, command: Callable[[list[str]], Command], devices: set[str]
    ) -> None:
        """Availability counts a cut device as unavailable, whatever it believes."""
        for w, proc in enumerate(self.workers):
            mine = [d for d in devices if self._owner[d] == w]
            if mine:
                await proc.send(command(mine))

    async def _measure_reconnect(self, up: float) -> None:
        """Time from the broker listening again until every agent is connected again."""
        n = len(self.plan.devices)
        # first make sure the workers have seen the loss, then wait for all to come back
        deadline = time.time() + max(self.scenario.drain_s, 30)
        while time.time() < deadline:
            await asyncio.sleep(0.05)
            # a worker's count is fresh only if its line came after the broker was back
            fresh = all(w.last_at >= up for w in self.workers)
            if fresh and self.connected == n:
                self.observed.reconnect_s.append(time.time() - up)
                return

    # ---- operators --------------------------------------------------------------------------

    def _on_centre_event(self, event: Any) -> None:
        if event.type != "alert":
            return
        operator = self.scenario.operator
        for stage, delay in (
            ("acknowledged", operator.ack_after_s),
            ("closed", operator.close_after_s),
        ):
            if delay is not None:
                self._spawn(self._operator_moves(event.event_id, stage, delay))

    async def _operator_moves(self, event_id: str, stage: str, delay: float) -> None:
        assert self._http is not None
        await asyncio.sleep(delay)
        url = f"http://127.0.0.1:{self.api_port}/alerts/{event_id}/{stage}"
        headers = {"Authorization": f"Bearer {self.operator_token}"}
        deadline = time.monotonic() + max(30.0, self.scenario.drain_s)
        while time.monotonic() < deadline:
            # the gateway may be down (a crash scenario): try again until it answers
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self._http.post(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.5)

    # ---- teardown ---------------------------------------------------------------------------

    async def _teardown(self) -> None:
        for proc in self.workers:
            if proc.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.process.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.process.wait(), 5)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.terminate()
            try:
                await asyncio.to_thread(self.gateway.wait, 10)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
        if self.proxy is not None:
            await self.proxy.close()
        if self.sink is not None:
            await self.sink.close()
        if self._http is not None:
            await self._http.close()
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
        self._unmount_disks()


def _child_env() -> dict[str, str]:
    # our children are not the systemd service: they must not ping its watchdog
    return {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
