"""A worker process: its share of the fleet, each the real agent on fake hardware, one loop.

Started by the simulator as `python -m simulator.worker SPEC.json` (a `WorkerSpec`). It
talks to the parent in JSON lines, typed in `simulator.messages`: commands on stdin (start,
cut, heal, damage, press, stop), lines on stdout (`up` once the agents are connected, `progress`
four times a second with what was sent and acked since the last line, `result` at the
end). No thread per device: agents are tasks, and
their MQTT sessions share the loop's socket callbacks (`ansimi.mqtt`).

Each agent is watched through its observer hook (`Watcher`, a `device.observer.
AgentObserver`): what left the device and when, the verified acks it saw, the SMS fallback's
progress and its link going down. Times are wall clock, so the parent can compare them
with the centre's arrival times. Every agent has a fake modem (recording each SMS with its
time) and one SMS number.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ansimi.webrtc_link import LinkCounts, impose_link
from device.agent import Agent
from device.behaviour import SmsProgress
from device.config import (
    BehaviourSection,
    DeviceConfig,
    DeviceSection,
    GatewaySection,
    MqttSection,
    OutboxSection,
    SmsSection,
)
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem
from device.observer import AgentObserver
from device.outbox import Outbox
from device.update import CURRENT_NAME, JOURNAL_NAME, RestartRequested
from device.video.config import VideoConfig
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import public_key_from_b64
from protocol.messages import AckStage, Alert, Body, Cancel, Heartbeat
from simulator.identities import device_key
from simulator.limits import raise_open_files
from simulator.messages import (
    COMMAND,
    AckSeen,
    Cut,
    Damage,
    DamageMode,
    Gap,
    Heal,
    LinkDeadSeen,
    Performed,
    Press,
    Progress,
    Result,
    Sent,
    SmsSent,
    Start,
    Stop,
    Up,
    VideoSeen,
    WorkerSpec,
    encode,
)
from simulator.updates import install_factory, launch, running_version, selftest_passes

log = logging.getLogger(__name__)

# what starts a doorbell's video (device/video/session.py says the same)
EMERGENCY_TRIGGERS = frozenset({"press", "long_press", "duress", "tamper"})
VIDEO_POLL_S = 0.02

PROGRESS_EVERY_S = 0.25


@dataclass
class Watched:
    agent: Agent
    inputs: FakeInputs
    district: str
    modem: FakeModem
    connected_samples: int = 0
    # a bell that updates itself: its update root, and how to start its agent again on the
    # same hardware, as systemd and the launcher do after the agent exits for a restart
    root: Path | None = None
    boot: Callable[[], Agent] | None = None


@dataclass
class Tally:
    """What happened since the last progress line (and running totals)."""

    sent: list[Sent] = field(default_factory=list)
    acks: list[AckSeen] = field(default_factory=list)
    first_sent: set[str] = field(default_factory=set)
    resends: int = 0
    heartbeats: int = 0
    heartbeats_by_device: dict[str, int] = field(default_factory=dict)
    # video sessions: [session id, device, offered at, connected at or None, emergency at]
    video: list[list[Any]] = field(default_factory=list)
    last_emergency: dict[str, float] = field(default_factory=dict)
    sms: list[SmsSent] = field(default_factory=list)
    link_dead: list[LinkDeadSeen] = field(default_factory=list)
    actions: int = 0
    errors: int = 0
    at_risk: list[str] = field(default_factory=list)
    # every action done: each must make its device send something
    performed: list[Performed] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)


class Watcher(AgentObserver):
    """One agent's events into the worker's tally: what left the device and when, which
    verified acks it saw, when the SMS fallback got an alert out, and when the agent saw
    its link go down (for a press on a black-holed link: press -> link declared dead)."""

    def __init__(self, worker: Worker, device_id: str) -> None:
        self.worker = worker
        self.device_id = device_id

    def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
        tally, device_id = self.worker.tally, self.device_id
        if isinstance(body, Alert | Cancel) and message_id is not None:
            if message_id in tally.first_sent:
                tally.resends += 1
                return
            tally.first_sent.add(message_id)
            kind: Literal["alert", "cancel"] = "alert" if isinstance(body, Alert) else "cancel"
            trigger = body.trigger if isinstance(body, Alert) else "cancel"
            tally.sent.append(Sent(message_id, device_id, kind, trigger, time.time()))
            if trigger in EMERGENCY_TRIGGERS:
                tally.last_emergency[device_id] = time.time()
            w = self.worker.watched.get(device_id)
            if device_id in self.worker.cut and w is not None and w.agent.link.connected:
                # a press on a dead link the agent has not noticed yet
                self.worker.pressed_on_cut.setdefault(device_id, time.time())
        elif isinstance(body, Heartbeat):
            tally.heartbeats += 1
            tally.heartbeats_by_device[device_id] = tally.heartbeats_by_device.get(device_id, 0) + 1

    def acked(self, ref: str, stage: AckStage) -> None:
        self.worker.tally.acks.append(AckSeen(ref, stage, time.time()))

    def sms_progress(self, alert_id: str, progress: SmsProgress) -> None:
        if progress == "sent":
            self.worker.tally.sms.append(SmsSent(alert_id, self.device_id, time.time()))

    def link_down(self) -> None:
        # The MQTT session's "link declared dead" moment (its PUBACK probe) is the same
        # instant: the session drops the socket and the agent hears the disconnect.
        pressed = self.worker.pressed_on_cut.pop(self.device_id, None)
        if pressed is not None:
            self.worker.tally.link_dead.append(LinkDeadSeen(self.device_id, pressed, time.time()))


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.settings = spec.device
        self.tally = Tally()
        self.skew_ms: dict[str, int] = {}
        self.watched: dict[str, Watched] = {}
        self.samples = 0
        self.sampling = False
        # devices whose network the simulator has cut: "connected" as they may believe they
        # are (a black hole is noticed only at the next keepalive), their path is not there
        self.cut: set[str] = set()
        # cut devices pressed while their agent believed the link up: device -> press time
        self.pressed_on_cut: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._actions: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}  # device -> its agent's task
        self.stopped: set[str] = set()  # agents the simulator has stopped for a while
        self.restarts = 0  # agents started again after asking to be (an update's switch)
        self.down_since: dict[str, float] = {}  # device -> first sample its link was down
        self._gateway_key = public_key_from_b64(spec.gateway_public_key)
        video = spec.video
        # the whole process's WebRTC: this worker holds only doorbells, so their sending side
        self.video_link: LinkCounts | None = (
            impose_link(video.link_loss, video.link_delay_ms / 1000, random.Random(spec.seed))
            if video.enabled and (video.link_loss or video.link_delay_ms)
            else None
        )
        proxied = set(spec.proxied)
        self._small_disk = set(spec.small_disk_devices)
        # what it takes to start an agent again (after its outbox was damaged)
        self._made: dict[str, tuple[str, str, int, str]] = {}
        for n, (device_id, kind, district) in enumerate(spec.devices):
            port = spec.proxy_port if device_id in proxied and spec.proxy_port else spec.broker_port
            sms_number = f"+8210{n:08d}"
            self._made[device_id] = (kind, district, port, sms_number)
            self.watched[device_id] = self._make(
                device_id, kind, district, port, self._gateway_key, sms_number
            )

    def _make(
        self,
        device_id: str,
        kind: str,
        district: str,
        port: int,
        gateway_key: Any,
        sms_number: str,
    ) -> Watched:
        s = self.settings
        home = self.spec.small_disk_dir if device_id in self._small_disk else None
        state_dir = (home or self.spec.state_dir) / device_id
        config = DeviceConfig.model_validate(
            {
                "device": DeviceSection(id=device_id, kind=kind, state_dir=state_dir),
                "gateway": GatewaySection(
                    id=self.spec.gateway_id, public_key=self.spec.gateway_public_key
                ),
                "mqtt": MqttSection(
                    host=self.spec.broker_host,
                    port=port,
                    version=self.spec.mqtt_version,
                    heartbeat_s=s.heartbeat_s,
                ),
                "outbox": OutboxSection(resend_min_s=s.resend_min_s, resend_max_s=s.resend_max_s),
                "video": VideoConfig(
                    start_on_emergency=True,
                    # gateway and devices share this host: a 127.0.0.1 candidate is needed
                    loopback_candidates=True,
                    codecs=["VP8"],
                    idle_stop_s=self.spec.video.idle_stop_s,
                ),
                "behaviour": BehaviourSection(
                    long_press_s=s.long_press_s,
                    cancel_hold_s=s.cancel_hold_s,
                    duress_hold_s=s.duress_hold_s,
                ),
                # a made-up number per agent: the fake modem only records it
                "sms": SmsSection(after_s=s.sms_after_s, numbers=[sms_number]),
                # a scenario's alerts are the ones it plans: a weekly slot falling inside a run
                # would be an alert its accounting never planned
                "test_press": {"enabled": False},
            }
        )
        inputs = FakeInputs(s.hold_repeat_s)
        video = self.spec.video
        camera = None
        if kind == "doorbell" and video.enabled:
            from device.hal.camera import SyntheticCamera

            camera = SyntheticCamera(video.width, video.height, video.fps)
        modem = FakeModem(port=f"fake-{device_id}")
        seed = int.from_bytes(hashlib.sha256(f"{self.spec.seed}:{device_id}".encode()).digest())
        updates = self.spec.updates
        root = None
        if updates is not None:
            # beside the state, as /var/lib/ansimi/agent is on a bell
            root = state_dir / "agent"
            if not (root / CURRENT_NAME).exists():
                install_factory(root, updates.installed)

        def boot() -> Agent:
            updater = None
            if updates is not None and root is not None:
                updater = launch(
                    root, public_key_from_b64(updates.release_public_key), trial_s=updates.trial_s
                )
                modem.sim_ready = selftest_passes(root)
            key = device_key(self.spec.run_secret, device_id)
            agent = Agent(
                config,
                signer=Signer(device_id, key),
                device_key=key,  # opens SMS numbers a remote config seals for this bell
                gateway_key=gateway_key,
                hardware=Hardware(inputs, FakeIndicator(), camera, modem),
                outbox=self._outbox(state_dir),
                clock_ms=self._clock_for(device_id),
                rng=random.Random(seed),
                observer=Watcher(self, device_id),
                updater=updater,
            )
            # like the outbox: thousands of agents on one disk would spend the run on fsync
            agent.sms.power_safe = False
            return agent

        return Watched(boot(), inputs, district, modem, root=root, boot=boot)

    def _outbox(self, state_dir: Path) -> Outbox:
        if self.spec.outbox_in_memory:
            # the fleet benchmark: three file descriptors less per agent, and no disk
            return Outbox(":memory:")
        # thousands of outboxes on one disk would spend the run waiting on fsync
        return Outbox(state_dir / "outbox.db", power_safe=False)

    def _clock_for(self, device_id: str) -> Callable[[], int]:
        skew = self.skew_ms
        return lambda: wall_ms() + skew.get(device_id, 0)

    def heal(self, device_ids: list[str]) -> None:
        """The link works again: a press the agent never found dead is counted as such."""
        self.cut -= set(device_ids)
        for device_id in device_ids:
            if (pressed := self.pressed_on_cut.pop(device_id, None)) is not None:
                self.tally.link_dead.append(LinkDeadSeen(device_id, pressed, None))

    # ---- running --------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return sum(1 for w in self.watched.values() if w.agent.link.connected)

    async def start_agents(self) -> None:
        # in small batches: a sleep per agent would drift far behind on a busy loop
        batch = max(1, round(self.settings.connect_rate / 20))
        for n, (device_id, w) in enumerate(self.watched.items(), start=1):
            self._start(device_id, w)
            if n % batch == 0:
                await asyncio.sleep(batch / self.settings.connect_rate)

    def _start(self, device_id: str, w: Watched) -> None:
        task = asyncio.create_task(self._run_agent(w), name=device_id)
        self._tasks.append(task)
        self._running[device_id] = task

    async def damage(self, mode: DamageMode, down_s: float, device_ids: list[str]) -> None:
        """Stop these agents, delete or corrupt their outboxes, start them again later.

        As an operator's `systemctl stop`, a cleanup script and a start would: the agent
        closes its outbox on the way out, the files are damaged while nobody holds them.
        """
        stopped = []
        self.stopped |= set(device_ids)
        for device_id in device_ids:
            w = self.watched[device_id]
            with contextlib.suppress(Exception):  # an agent that died has closed its outbox
                self.tally.at_risk += [e.id for e in w.agent.outbox.pending()]
            task = self._running.pop(device_id, None)
            if task is not None:
                task.cancel()
                stopped.append(task)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*stopped, return_exceptions=True), 10)
        for device_id in device_ids:
            state_dir = self.watched[device_id].agent.config.device.state_dir
            await asyncio.to_thread(damage_outbox, state_dir / "outbox.db", mode)
        await asyncio.sleep(down_s)
        for device_id in device_ids:
            # pressable again only once its new agent runs (they start 0.1 s apart: a press
            # meanwhile went to the stopped agent and was never sent)
            self.stopped.discard(device_id)
            kind, district, port, sms_number = self._made[device_id]
            old = self.watched[device_id]
            try:
                w = self._make(device_id, kind, district, port, self._gateway_key, sms_number)
            except Exception:
                # as a service that will not start: counted, and the bell stays dead (a press
                # on it is lost and fails the run)
                self.tally.errors += 1
                log.exception("agent %s cannot start after its outbox was %sd", device_id, mode)
                continue
            w.connected_samples = old.connected_samples
            self.watched[device_id] = w
            self._start(device_id, w)

    async def _run_agent(self, w: Watched) -> None:
        while await self._run_until_exit(w):
            assert w.boot is not None
            # exit 75: systemd starts the launcher again, which starts what `current` names;
            # the same buttons and modem, a new agent (its incident, in memory, is gone)
            self.restarts += 1
            w.agent = w.boot()

    async def _run_until_exit(self, w: Watched) -> bool:
        """Run the agent until it ends; True if it asked to be started again."""
        restart = False
        try:
            try:
                await w.agent.run()
            except* RestartRequested:
                restart = True
        except asyncio.CancelledError:
            raise
        except Exception:
            self.tally.errors += 1
            log.exception("agent %s stopped", w.agent.device_id)
            return False
        return restart

    async def wait_connected(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        # polled: "connected" lives in each paho session, with no event to await across them
        while self.connected < len(self.watched) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    async def run_plan(self, t0: float) -> None:
        for skew in self.spec.skews:
            self._spawn(self._skew(t0 + skew.at, skew.device_ids, skew.skew_ms))
        for at, device_id, action, after_s, restore_s in self.spec.steps:
            delay = t0 + at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.act(device_id, action, after_s, restore_s)

    def act(
        self, device_id: str, action: str, after_s: float = 1.0, restore_s: float = 5.0
    ) -> None:
        """A person does `action` to the device now (counted: its device must send)."""
        if device_id in self.stopped:
            return  # nobody presses a bell whose agent is not running: not counted
        w = self.watched[device_id]
        self.tally.actions += 1
        self.tally.performed.append(Performed(device_id, action, time.time()))
        self._spawn(self._perform(w, action, after_s, restore_s))

    async def _skew(self, when: float, device_ids: list[str], skew_ms: int) -> None:
        await asyncio.sleep(max(0.0, when - time.time()))
        for device_id in device_ids:
            self.skew_ms[device_id] = skew_ms

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _perform(self, w: Watched, action: str, after_s: float, restore_s: float) -> None:
        s = self.settings
        i = w.inputs
        if action == "press":
            await i.hold("emergency", 0.1)
        elif action == "long_press":
            await i.hold("emergency", s.long_press_s + 0.3)
        elif action == "ring":
            await i.hold("doorbell", 0.1)
        elif action == "ring_emergency":
            # the stalker rings; the person inside holds the doorbell's emergency gesture
            await i.hold("doorbell", 0.1)
            await asyncio.sleep(after_s)
            await i.hold("doorbell", s.long_press_s + 0.3)
        elif action in ("cancel", "duress"):
            await i.hold("emergency", 0.1)
            await asyncio.sleep(after_s)
            hold = s.cancel_hold_s if action == "cancel" else s.duress_hold_s
            await i.hold("emergency", hold + 0.3)
        elif action == "tamper":
            i.open_tamper()
            await asyncio.sleep(restore_s)
            i.close_tamper()
        elif action == "power_loss":
            i.lose_power()
            await asyncio.sleep(restore_s)
            i.restore_power()

    async def watch_video(self) -> None:
        """When each doorbell's stream is offered and when it connects (polled: aiortc's
        state changes are the video manager's to handle, not ours to hook)."""
        with_video = [w for w in self.watched.values() if w.agent.video is not None]
        open_: dict[str, list[Any]] = {}
        while with_video:
            await asyncio.sleep(VIDEO_POLL_S)
            for w in with_video:
                assert w.agent.video is not None
                session = w.agent.video.session
                if session is None:
                    continue
                entry = open_.get(session.id)
                if entry is None:
                    since = self.tally.last_emergency.get(w.agent.device_id)
                    entry = [session.id, w.agent.device_id, time.time(), None, since]
                    open_[session.id] = entry
                    self.tally.video.append(entry)
                if entry[3] is None and session.pc.connectionState == "connected":
                    entry[3] = time.time()

    def sample(self) -> None:
        if not self.sampling:
            return
        self.samples += 1
        now = time.time()
        for device_id, w in self.watched.items():
            up = w.agent.link.connected
            if up and device_id not in self.cut:
                w.connected_samples += 1
            # the device's own view of its link: a reset it recovers from is a short gap
            if not up:
                self.down_since.setdefault(device_id, now)
            elif (since := self.down_since.pop(device_id, None)) is not None:
                self.tally.gaps.append(Gap(device_id, since, now))

    def close_gaps(self) -> None:
        now = time.time()
        self.tally.gaps += [Gap(d, since, now) for d, since in self.down_since.items()]
        self.down_since.clear()

    def progress(self) -> Progress:
        t = self.tally
        line = Progress(
            at=time.time(),
            connected=self.connected,
            sent=t.sent,
            acks=t.acks,
            actions=t.actions,
            resends=t.resends,
            heartbeats=t.heartbeats,
            errors=t.errors,
            sms=t.sms,
            link_dead=t.link_dead,
            at_risk=t.at_risk,
            performed=t.performed,
            gaps=t.gaps,
            updating=len(self.updating()),
        )
        t.sent, t.acks, t.sms, t.link_dead = [], [], [], []
        t.at_risk, t.performed, t.gaps = [], [], []
        return line

    def updating(self) -> list[str]:
        """Bells with an update under way: a journal in their update root."""
        return sorted(
            d for d, w in self.watched.items() if w.root and (w.root / JOURNAL_NAME).exists()
        )

    def result(self) -> Result:
        samples = max(self.samples, 1)
        depth: dict[str, int] = {}
        for device_id, w in self.watched.items():
            with contextlib.suppress(Exception):  # an agent that died has closed its outbox
                if n := w.agent.outbox.depth():
                    depth[device_id] = n
        return Result(
            availability={d: w.connected_samples / samples for d, w in self.watched.items()},
            outbox=depth,
            heartbeats=self.tally.heartbeats_by_device,
            video=[VideoSeen(*entry) for entry in self.tally.video],
            not_ready=sum(1 for w in self.watched.values() if not w.agent.ready.is_set()),
            rejected=sum(sum(w.agent.link.rejected.values()) for w in self.watched.values()),
            sms_sent=sum(len(w.modem.sent) for w in self.watched.values()),
            video_datagrams=self.video_link.sent if self.video_link else 0,
            video_dropped=self.video_link.dropped if self.video_link else 0,
            versions={d: running_version(w.root) for d, w in self.watched.items() if w.root},
            updating=self.updating(),
            restarts=self.restarts,
        )

    async def stop(self) -> None:
        for task in [*self._actions, *self._tasks]:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*self._tasks, *self._actions, return_exceptions=True), 10
            )


def damage_outbox(path: Path, mode: DamageMode) -> None:
    """`delete`: the outbox and its WAL gone (a reset SD card, a wiped state folder).
    `corrupt`: garbage over the end of the file, where the newest pages are.
    `restart`: nothing (the agent is only stopped and started)."""
    if mode == "restart":
        return
    if mode == "delete":
        for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                (path.parent / name).unlink()
        return
    size = path.stat().st_size
    garbage = random.Random(size).randbytes(min(size // 2, 8192))
    with path.open("r+b") as out:
        out.seek(size - len(garbage))
        out.write(garbage)


def emit(line: Up | Progress | Result) -> None:
    sys.stdout.buffer.write(encode(line))
    sys.stdout.flush()


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(spec_path: Path) -> None:
    raise_open_files()
    spec = WorkerSpec.model_validate_json(spec_path.read_text())
    commands = await _commands()
    worker = Worker(spec)

    async def ramp() -> None:
        await worker.start_agents()
        await worker.wait_connected(spec.connect_timeout_s)
        emit(Up(connected=worker.connected, total=len(worker.watched)))

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            worker.sample()
            emit(worker.progress())

    # progress from the first agent on, and commands heard even during a slow ramp
    reporter = asyncio.create_task(report())
    video = asyncio.create_task(worker.watch_video())
    ramping = asyncio.create_task(ramp())
    plan: asyncio.Task[None] | None = None
    damaging: list[asyncio.Task[None]] = []
    try:
        # bounded by the parent: it always sends `stop` (or closes stdin) when it is done
        while raw := await commands.readline():
            command = COMMAND.validate_json(raw)
            if isinstance(command, Start):
                worker.sampling = True
                plan = asyncio.create_task(worker.run_plan(command.at))
            elif isinstance(command, Cut):
                worker.cut |= set(command.device_ids)
            elif isinstance(command, Heal):
                worker.heal(command.device_ids)
            elif isinstance(command, Press):
                for device_id in command.device_ids:
                    worker.act(device_id, "press")
            elif isinstance(command, Damage):
                damaging.append(
                    asyncio.create_task(
                        worker.damage(command.mode, command.down_s, command.device_ids)
                    )
                )
            elif isinstance(command, Stop):
                break
        worker.sampling = False
        worker.close_gaps()
        for task in (ramping, plan, reporter, video, *damaging):
            if task is not None:
                task.cancel()
        emit(worker.progress())
        emit(worker.result())
    finally:
        await worker.stop()


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.ERROR, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    asyncio.run(main(Path(sys.argv[1])))
