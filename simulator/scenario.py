"""Scenario files: who is in the fleet, what people do, what breaks, and what counts as a pass.

A scenario is a TOML file validated by the models below (`simulator/scenarios/README.md`
describes every key). `plan()` turns it, with its seed, into a fleet and a list of timed
actions; the same file and seed always give the same run, so a failure can be repeated.

All scenario times (`duration_s`, event windows, fault times and lengths) are multiplied
by `time_scale`, so a ten-minute outage can run as ten seconds in CI. Device timings
(heartbeat, hold lengths) are not scaled: they are the device's own configuration.
"""

from __future__ import annotations

import math
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ansimi.config import ConfigError, _describe
from device.config import BehaviourSection, MqttSection, OutboxSection, SmsSection
from protocol.messages import DEVICE_KINDS, DeviceKind
from protocol.release import Version, version_key

Kind = DeviceKind
KINDS = DEVICE_KINDS
# More planned actions than this is a scenario mistake, not a load test: keeps every run bounded.
MAX_ACTIONS = 200_000
Seconds = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Fleet(_Model):
    count: Annotated[int, Field(ge=1, le=20_000)] = 10
    # relative weights of the device kinds
    mix: dict[Kind, Annotated[float, Field(ge=0)]] = {"bell": 1.0}
    # relative weights of districts (Seoul district codes, see ansimi/districts.py)
    districts: dict[str, Annotated[float, Field(ge=0)]] = {"mapo": 1.0}

    @model_validator(mode="after")
    def _weights(self) -> Fleet:
        if sum(self.mix.values()) <= 0 or sum(self.districts.values()) <= 0:
            raise ValueError("mix and districts need at least one positive weight")
        from ansimi.districts import check_district

        for district in self.districts:
            check_district(district)
        return self


def device_default(section: type[BaseModel], name: str) -> Any:
    """The device's own default for a setting: the simulator keeps no copy that can drift."""
    return section.model_fields[name].default


class DeviceSettings(_Model):
    heartbeat_s: Annotated[float, Field(gt=0)] = device_default(MqttSection, "heartbeat_s")
    resend_min_s: Annotated[float, Field(gt=0)] = device_default(OutboxSection, "resend_min_s")
    resend_max_s: Annotated[float, Field(gt=0)] = device_default(OutboxSection, "resend_max_s")
    long_press_s: Annotated[float, Field(gt=0)] = device_default(BehaviourSection, "long_press_s")
    cancel_hold_s: Annotated[float, Field(gt=0)] = device_default(BehaviourSection, "cancel_hold_s")
    duress_hold_s: Annotated[float, Field(gt=0)] = device_default(BehaviourSection, "duress_hold_s")
    # how often a held button ticks (gpiozero's hold_repeat)
    hold_repeat_s: Annotated[float, Field(gt=0)] = 0.25
    # connections opened per second at start-up, so mosquitto is not hit by all at once
    connect_rate: Annotated[float, Field(gt=0)] = 500.0
    # an alert the gateway has not received this long after the press goes out by SMS
    sms_after_s: Annotated[float, Field(gt=0)] = device_default(SmsSection, "after_s")


class GatewaySettings(_Model):
    forward_backoff_min_s: Annotated[float, Field(gt=0)] = 0.5
    forward_backoff_max_s: Annotated[float, Field(gt=0)] = 5.0
    breaker_failures: Annotated[int, Field(ge=1)] = 5
    breaker_open_s: Annotated[float, Field(gt=0)] = 2.0
    # offline after this many missed heartbeats
    missed: Annotated[int, Field(ge=1)] = 3
    # after a last will, how long the gateway waits for the bell to reconnect (it caps
    # this at half the silence timeout)
    will_grace_s: Annotated[float, Field(ge=0)] = 10.0

    def will_grace(self, heartbeat_s: float) -> float:
        """The grace the gateway applies: a link down shorter than this is no outage."""
        return min(self.will_grace_s, heartbeat_s * self.missed / 2)


class Video(_Model):
    """Doorbell live video: simulated doorbells get a synthetic camera and stream to the
    gateway's video hub over WebRTC on loopback when an emergency starts."""

    enabled: bool = False
    # small frames keep encoding cheap on a shared machine; the path is what is measured
    width: Annotated[int, Field(ge=16, le=1280, multiple_of=2)] = 320
    height: Annotated[int, Field(ge=16, le=720, multiple_of=2)] = 240
    fps: Annotated[int, Field(ge=1, le=30)] = 10
    # the device stops streaming when nobody has watched this long
    idle_stop_s: Annotated[float, Field(gt=0)] = 5.0
    # a poor radio link for the doorbells' video (ansimi/webrtc_link.py, in each worker
    # process): this share of the datagrams they send is dropped, the rest sent this late
    link_loss: Annotated[float, Field(ge=0, lt=1)] = 0.0
    link_delay_ms: Annotated[int, Field(ge=0, le=5000)] = 0


class Operator(_Model):
    # an operator acknowledges each alert this long after it reaches the centre (unset: never)
    ack_after_s: Seconds | None = None
    # ...and closes its incident this long after it reached the centre (unset: never). A bell
    # with an open incident is offered no update and does not switch to one
    close_after_s: Seconds | None = None


Action = Literal[
    "press",
    "long_press",
    "ring",
    "ring_emergency",
    "cancel",
    "duress",
    "tamper",
    "power_loss",
]
# which kinds can do what (a ring needs a doorbell)
ACTION_KINDS: dict[str, tuple[Kind, ...]] = {
    "ring": ("doorbell",),
    "ring_emergency": ("doorbell",),
}


class Event(_Model):
    action: Action
    # a fixed number of actions spread uniformly over the window...
    count: Annotated[int, Field(ge=0)] | None = None
    # ...or a Poisson process with this many actions per minute across the fleet
    rate_per_min: Annotated[float, Field(gt=0)] | None = None
    start_s: Seconds = 0.0
    end_s: Seconds | None = None  # default: the scenario's duration
    kinds: list[Kind] | None = None
    districts: list[str] | None = None
    # compound actions: the second step (cancel hold, emergency after a ring) this much later
    after_s: Seconds = 1.0
    # tamper and power loss: back to normal after this long
    restore_after_s: Seconds = 5.0

    @model_validator(mode="after")
    def _one_amount(self) -> Event:
        if (self.count is None) == (self.rate_per_min is None):
            raise ValueError(f"event {self.action}: set exactly one of count and rate_per_min")
        return self


class BrokerRestart(_Model):
    type: Literal["broker_restart"]
    at_s: Seconds
    down_s: Seconds = 1.0
    # SIGKILL (a crash: in-memory queues lost) rather than SIGTERM
    kill: bool = True


class GatewayKill(_Model):
    type: Literal["gateway_kill"]
    at_s: Seconds
    down_s: Seconds = 2.0


class Partition(_Model):
    """Devices cut off from the broker by the simulator's TCP proxy."""

    type: Literal["partition"]
    at_s: Seconds
    duration_s: Seconds
    fraction: Fraction = 0.1
    # instead of a random fraction: every device of these districts (a district outage)
    districts: list[str] | None = None
    # drop: connections reset, reconnects refused; hold: packets black-holed, sockets stay open
    mode: Literal["drop", "hold"] = "drop"


class Latency(_Model):
    type: Literal["latency"]
    at_s: Seconds
    duration_s: Seconds
    fraction: Fraction = 1.0
    delay_ms: Annotated[float, Field(ge=0, le=60_000)] = 200.0
    # chance per chunk forwarded that the link fails and the connection is reset
    loss: Annotated[float, Field(ge=0, le=0.5)] = 0.0


class CentreDown(_Model):
    type: Literal["centre_down"]
    at_s: Seconds
    duration_s: Seconds
    # 503: the centre answers "unavailable"; refuse: it stops listening altogether
    mode: Literal["503", "refuse"] = "503"


class GatewayDiskFull(_Model):
    """The gateway's disk fills up, then is freed: its database lives on a small tmpfs the
    simulator mounts (root only), filled with a file until `free_kb` is left."""

    type: Literal["gateway_disk_full"]
    at_s: Seconds
    duration_s: Seconds
    free_kb: Annotated[int, Field(ge=0)] = 0
    disk_mb: Annotated[int, Field(ge=8, le=4096)] = 64


class DeviceDiskFull(_Model):
    """Some bells' disks fill up, then are freed: their state folders (the outbox) live on
    one small tmpfs the simulator mounts (root only) and fills."""

    type: Literal["device_disk_full"]
    at_s: Seconds
    duration_s: Seconds
    fraction: Fraction = 0.1
    disk_mb: Annotated[int, Field(ge=4, le=4096)] = 32


class OutboxDamage(_Model):
    """Some agents are stopped, their outbox deleted (`delete`: outbox.db and its WAL) or
    damaged (`corrupt`: garbage over the end of outbox.db), or left alone (`restart`), and
    started again `down_s` later. Alerts waiting in a destroyed outbox are reported apart,
    not as lost."""

    type: Literal["outbox_damage"]
    at_s: Seconds
    fraction: Fraction = 0.1
    mode: Literal["delete", "corrupt", "restart"] = "delete"
    down_s: Seconds = 2.0
    # the devices an earlier fault (its index in `faults`) touched, instead of `fraction`:
    # a restart first makes the counter jump a block, as months of service would
    same_devices_as: Annotated[int, Field(ge=0)] | None = None


class ClockSkew(_Model):
    type: Literal["clock_skew"]
    at_s: Seconds = 0.0
    fraction: Fraction = 0.1
    # added to those devices' clocks; the gateway refuses beyond its window (300 s)
    skew_s: Annotated[float, Field(ge=-3600, le=3600)] = 30.0


Fault = Annotated[
    BrokerRestart
    | GatewayKill
    | Partition
    | Latency
    | CentreDown
    | ClockSkew
    | GatewayDiskFull
    | DeviceDiskFull
    | OutboxDamage,
    Field(discriminator="type"),
]
PROXIED = ("partition", "latency")
# faults that need a tmpfs mounted (root): `needs_mount` says so before anything starts
MOUNTED = ("gateway_disk_full", "device_disk_full")


class Thresholds(_Model):
    # alerts (and cancels) sent by a device that never reached the centre
    max_lost: Annotated[int, Field(ge=0)] = 0
    received_p95_s: Seconds | None = None
    # emergency alert leaving a doorbell to its video stream connected at the gateway
    video_p95_s: Seconds | None = None
    delivered_p95_s: Seconds | None = None
    delivered_max_s: Seconds | None = None
    acknowledged_p95_s: Seconds | None = None
    max_duplicates: Annotated[int, Field(ge=0)] | None = None
    reconnect_s: Seconds | None = None
    offline_detect_p95_s: Seconds | None = None
    # `offline` status events the centre may receive (0 on a quiet night: nobody dropped)
    max_offline_reports: Annotated[int, Field(ge=0)] | None = None
    # offline reports about one device in one of its outages (a partition it was in, its
    # agent stopped): more is flapping. Always judged.
    max_offline_per_outage: Annotated[int, Field(ge=1)] = 1
    # offline reports about a device that had no outage then: a fleet the gateway stopped
    # hearing, a bell it refused. Always judged.
    max_false_offline: Annotated[int, Field(ge=0)] = 0
    # fraction of device-time connected, per district
    min_availability: Fraction | None = None
    # press to the SMS fallback's message leaving the (fake) modem
    press_to_sms_p95_s: Seconds | None = None
    # press on a black-holed link to the agent declaring that link dead; a press whose
    # link was never found dead before it healed fails the run when this is set
    press_to_link_dead_p95_s: Seconds | None = None


class Release(_Model):
    """One agent release the rollout ships: a tiny real wheel (simulator/updates.py), signed
    with the run's release key by `ansimi provision release build`."""

    version: Version
    # the rollout's steps, in percent of the district: started at the first, widened to
    # each next one once the one before is done
    steps: Annotated[list[Annotated[float, Field(gt=0, le=100)]], Field(min_length=1)] = [100.0]
    # a broken release: its self-test fails on every bell, which must roll back by itself
    selftest_fails: bool = False

    @model_validator(mode="after")
    def _widening(self) -> Release:
        if self.steps != sorted(set(self.steps)):
            raise ValueError(f"release {self.version}: steps must grow, e.g. [10, 50, 100]")
        return self


class Rollout(_Model):
    """Agent updates during the run: every bell is installed at `installed` with an update
    root of its own; the releases are rolled out one after the other to `district` through
    the gateway's admin API (`ansimi provision release add`, `rollout start`, `resume`)."""

    district: str = "mapo"
    installed: Version = "1.0"
    # the first rollout starts this long after the scenario's start (scaled)
    start_s: Seconds = 0.0
    releases: Annotated[list[Release], Field(min_length=1)]
    # the bells' health-check deadline after a switch (device setting: not scaled)
    trial_s: Annotated[float, Field(gt=0)] = 60.0
    # the gateway's [updates]: pause at this share of failed devices; offer again after
    pause_failed_pct: Annotated[float, Field(gt=0, le=100)] = 10.0
    reoffer_s: Annotated[float, Field(gt=0)] = 30.0
    # a step not done (or paused) this long after it began fails the run (not scaled)
    step_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    # as each step begins, this many of the bells just offered the release are pressed
    # (chosen with the seed): presses during their download, switch wait and trial
    presses_per_step: Annotated[int, Field(ge=0)] = 2
    # presses during each release's rollout, at least: fewer proves nothing about them
    min_presses: Annotated[int, Field(ge=0)] = 1

    @model_validator(mode="after")
    def _versions(self) -> Rollout:
        from ansimi.districts import check_district

        check_district(self.district)
        versions = [version_key(v) for v in (self.installed, *(r.version for r in self.releases))]
        if versions != sorted(set(versions)):
            raise ValueError("rollout: each release must be newer than the one before it")
        return self


class Broker(_Model):
    # mosquitto's snapshot period: a restart "after the first autosave" (which brings back
    # the persistent sessions, see FIELD-NOTES) needs the fault later than this (not scaled)
    autosave_interval_s: Annotated[int, Field(ge=1, le=3600)] = 60


class Scenario(_Model):
    name: str
    description: str = ""
    seed: int = 1
    duration_s: Annotated[float, Field(gt=0, le=24 * 3600)] = 30.0
    # after the scenario: how long to wait for every alert to reach the centre
    drain_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    time_scale: Annotated[float, Field(gt=0, le=100)] = 1.0
    # one or more worker processes, each running its share of the agents on one event loop
    workers: Annotated[int, Field(ge=1, le=16)] | None = None
    fleet: Fleet = Fleet()
    broker: Broker = Broker()
    device: DeviceSettings = DeviceSettings()
    gateway: GatewaySettings = GatewaySettings()
    operator: Operator = Operator()
    video: Video = Video()
    events: list[Event] = []
    faults: list[Fault] = []
    rollout: Rollout | None = None
    thresholds: Thresholds = Thresholds()
    # things a scenario asks for that the simulator does not do yet (shown in the report)
    todo: list[str] = []

    def scaled(self, seconds: float) -> float:
        return seconds * self.time_scale

    @property
    def needs_proxy(self) -> bool:
        return any(f.type in PROXIED for f in self.faults)

    @property
    def needs_mount(self) -> bool:
        return any(f.type in MOUNTED for f in self.faults)


def load_scenario(path: Path, **overrides: Any) -> Scenario:
    """Read a scenario file; `overrides` (e.g. time_scale) replace top-level keys."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(path, [f"cannot read it: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}. Fix: correct the syntax there"]) from None
    data.setdefault("name", path.stem)
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "devices":
            data.setdefault("fleet", {})["count"] = value
        else:
            data[key] = value
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, [_describe(e, Scenario) for e in exc.errors()]) from None


# ---- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimDevice:
    id: str
    kind: Kind
    district: str


@dataclass(frozen=True, slots=True)
class Step:
    """One thing a simulated person does to one device, `at` seconds after the start."""

    at: float
    device: str
    action: Action
    # compound actions: the second step this long after the first (a person's timing)
    after_s: float = 1.0
    # tamper and power loss: back to normal this long after (scaled like the scenario)
    restore_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Plan:
    devices: list[SimDevice]
    steps: list[Step]
    # fault index -> the devices it touches (partition, latency, clock skew, bell disks,
    # outboxes)
    targets: dict[int, list[str]]


def _apportion(weights: dict[str, float], total: int) -> list[str]:
    """`total` labels in proportion to `weights` (largest remainder), interleaved."""
    norm = sum(weights.values())
    exact = {k: total * w / norm for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[:left]:
        counts[k] += 1
    # interleave so that the first devices already show the whole mix
    ranks = sorted(((i + 0.5) / n, k) for k, n in counts.items() if n for i in range(n))
    return [k for _, k in ranks]


def fleet(scenario: Scenario) -> list[SimDevice]:
    f = scenario.fleet
    kinds = _apportion({str(k): w for k, w in f.mix.items()}, f.count)
    rng = random.Random(scenario.seed)
    districts = _apportion(dict(f.districts), f.count)
    rng.shuffle(districts)
    return [
        SimDevice(f"sim-{kind}-{n:05d}", kind, district)  # type: ignore[arg-type]
        for n, (kind, district) in enumerate(zip(kinds, districts, strict=True), start=1)
    ]


def plan(scenario: Scenario) -> Plan:
    devices = fleet(scenario)
    rng = random.Random(scenario.seed)
    steps: list[Step] = []
    for event in scenario.events:
        allowed = event.kinds or ACTION_KINDS.get(event.action, KINDS)
        pool = [
            d
            for d in devices
            if d.kind in allowed and (event.districts is None or d.district in event.districts)
        ]
        if not pool:
            continue
        start = scenario.scaled(event.start_s)
        end = scenario.scaled(event.end_s if event.end_s is not None else scenario.duration_s)
        end = min(end, scenario.scaled(scenario.duration_s))
        times: list[float] = []
        if event.count is not None:
            times = sorted(rng.uniform(start, end) for _ in range(event.count))
        elif event.rate_per_min is not None:
            per_s = event.rate_per_min / 60 / scenario.time_scale
            t = start + rng.expovariate(per_s)
            while t < end and len(times) < MAX_ACTIONS:
                times.append(t)
                t += rng.expovariate(per_s)
        restore = scenario.scaled(event.restore_after_s)
        steps += [Step(t, rng.choice(pool).id, event.action, event.after_s, restore) for t in times]
        if len(steps) > MAX_ACTIONS:
            raise ValueError(f"{scenario.name}: more than {MAX_ACTIONS} actions planned")
    steps.sort(key=lambda s: s.at)
    targets: dict[int, list[str]] = {}
    for index, fault in enumerate(scenario.faults):
        if isinstance(fault, OutboxDamage) and fault.same_devices_as is not None:
            if fault.same_devices_as not in targets:
                raise ValueError(
                    f"{scenario.name}: fault {index} has same_devices_as = "
                    f"{fault.same_devices_as}, which is not an earlier fault with devices"
                )
            targets[index] = targets[fault.same_devices_as]
        elif isinstance(fault, Partition) and fault.districts is not None:
            targets[index] = [d.id for d in devices if d.district in fault.districts]
        elif isinstance(fault, Partition | Latency | ClockSkew | DeviceDiskFull | OutboxDamage):
            chosen = rng.sample(devices, round(len(devices) * fault.fraction))
            targets[index] = sorted(d.id for d in chosen)
    return Plan(devices, steps, targets)
