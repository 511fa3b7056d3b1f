"""What the simulator's run and its worker processes say to each other, typed.

The run writes a `WorkerSpec` to a file and starts `python -m simulator.worker SPEC.json`.
Then, one JSON object a line: `Command`s on the worker's stdin (start, cut, heal, damage,
press, stop), `WorkerLine`s on its stdout (up, progress, result). Both ends parse with these
models, so a field one side renames or forgets fails at the first line, by name, instead
of as a KeyError deep in a run (the fleet bench once sent a spec without `sms_after_s`).
The many small records of a progress line are tuples (JSON arrays): a line can carry
thousands of sends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from protocol.messages import AckStage
from simulator.scenario import DeviceSettings, Kind, Video

DamageMode = Literal["delete", "corrupt", "restart"]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- the spec: the worker's share of the fleet and its plan ---------------------------------


class Member(NamedTuple):
    device_id: str
    kind: Kind
    district: str


class Step(NamedTuple):
    """An action on one device at `at` seconds after the start."""

    at: float
    device_id: str
    action: str
    after_s: float
    restore_s: float


class Skew(NamedTuple):
    """From `at` seconds after the start, these devices' clocks are `skew_ms` off."""

    at: float
    device_ids: list[str]
    skew_ms: int


class UpdateSpec(_Message):
    """Bells that update themselves: each gets an update root (`<state>/agent`) installed
    at `installed`, and is started again, as systemd would, when its agent asks to be."""

    release_public_key: str  # what device.toml's [update] pins
    installed: str
    trial_s: float


class WorkerSpec(_Message):
    broker_host: str
    broker_port: int
    mqtt_version: Literal[3, 5] = 5
    # the devices a network fault touches connect through the proxy
    proxy_port: int | None = None
    proxied: list[str] = []
    gateway_id: str
    gateway_public_key: str
    run_secret: str  # the devices' keys derive from it (simulator.identities)
    seed: int
    state_dir: Path
    # the fleet benchmark: no disk, three file descriptors less per agent
    outbox_in_memory: bool = False
    small_disk_dir: Path | None = None
    small_disk_devices: list[str] = []
    device: DeviceSettings
    video: Video = Video()
    devices: list[Member]
    steps: list[Step] = []
    skews: list[Skew] = []
    connect_timeout_s: float
    updates: UpdateSpec | None = None


# ---- commands: the run to its worker (stdin) ------------------------------------------------


class Start(_Message):
    kind: Literal["start"] = "start"
    at: float  # wall clock of the scenario's time 0


class Cut(_Message):
    """The simulator cut these devices' network (the agents may not know yet)."""

    kind: Literal["cut"] = "cut"
    device_ids: list[str]


class Heal(_Message):
    kind: Literal["heal"] = "heal"
    device_ids: list[str]


class Damage(_Message):
    """Stop these agents, damage their outboxes, start them again `down_s` later."""

    kind: Literal["damage"] = "damage"
    mode: DamageMode
    down_s: float
    device_ids: list[str]


class Press(_Message):
    """Press these bells now (the rollout presses bells it is updating)."""

    kind: Literal["press"] = "press"
    device_ids: list[str]


class Stop(_Message):
    kind: Literal["stop"] = "stop"


Command = Annotated[Start | Cut | Heal | Damage | Press | Stop, Field(discriminator="kind")]
COMMAND: TypeAdapter[Command] = TypeAdapter(Command)


# ---- lines: the worker to its run (stdout) --------------------------------------------------


class Sent(NamedTuple):
    message_id: str
    device_id: str
    type: Literal["alert", "cancel"]
    trigger: str
    at: float


class AckSeen(NamedTuple):
    ref: str
    stage: AckStage
    at: float


class SmsSent(NamedTuple):
    alert_id: str
    device_id: str
    at: float


class LinkDeadSeen(NamedTuple):
    """A press while the link was cut and the agent still believed it up."""

    device_id: str
    pressed_at: float
    dead_at: float | None  # None: healed before the agent noticed


class Performed(NamedTuple):
    device_id: str
    action: str
    at: float


class Gap(NamedTuple):
    """The device's link was down from `since` until `until`, as the device saw it."""

    device_id: str
    since: float
    until: float


class VideoSeen(NamedTuple):
    session_id: str
    device_id: str
    offered_at: float
    connected_at: float | None
    emergency_at: float | None  # the device's last emergency before the offer


class Up(_Message):
    kind: Literal["up"] = "up"
    connected: int
    total: int


class Progress(_Message):
    """What happened since the last progress line, and running totals."""

    kind: Literal["progress"] = "progress"
    at: float
    connected: int
    sent: list[Sent] = []
    acks: list[AckSeen] = []
    actions: int = 0
    resends: int = 0
    heartbeats: int = 0
    errors: int = 0
    sms: list[SmsSent] = []
    link_dead: list[LinkDeadSeen] = []
    # ids of alerts that were waiting in an outbox the simulator then destroyed
    at_risk: list[str] = []
    performed: list[Performed] = []
    gaps: list[Gap] = []
    updating: int = 0  # bells with an update under way (a journal in their update root)


class Result(_Message):
    kind: Literal["result"] = "result"
    availability: dict[str, float]  # device -> share of samples it was connected
    outbox: dict[str, int]  # device -> entries left in its outbox
    heartbeats: dict[str, int]  # device -> heartbeats sent
    video: list[VideoSeen] = []
    # agents whose link never finished its after-connect step (a broken hook, say)
    not_ready: int = 0
    rejected: int = 0  # downlink messages the agents refused
    sms_sent: int = 0
    # the doorbells' WebRTC datagrams through the imposed video link, and those it dropped
    video_datagrams: int = 0
    video_dropped: int = 0
    # bells that update themselves: the version each runs at the end, those with an update
    # still under way (a journal left), and the agents' restarts (exit 75) in all
    versions: dict[str, str] = {}
    updating: list[str] = []
    restarts: int = 0


WorkerLine = Annotated[Up | Progress | Result, Field(discriminator="kind")]
WORKER_LINE: TypeAdapter[WorkerLine] = TypeAdapter(WorkerLine)


def encode(message: BaseModel) -> bytes:
    """One line of the conversation."""
    return message.model_dump_json().encode() + b"\n"
