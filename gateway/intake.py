"""Intake: every uplink message is checked, kept, and only then acknowledged.

Checks, in order of cost: size, topic, signature against the registry, the device not
revoked, replay and time window, schema (parsed inside `open_from_device`). A refused
message is counted by reason and logged with the device id only; nothing escapes.

Messages are processed in batches: one group commit per batch, then the `received` acks.

Heartbeats may wait (`heartbeat_flush_ms`): they are kept together, in one transaction
at most that often (or when `batch_max` of them wait), instead of in every batch they
arrive in. At a city's scale heartbeats are the load and arrive a few at a time, so a
transaction (and its fsync) per wake-up is most of their cost. What waits is liveness
only: nobody waits for a heartbeat's ack (it has none), alerts are never held back, and a
gateway that crashes loses at most one interval of heartbeats (last seen, a heartbeat's
high-water mark, a power change or a return online the next heartbeat brings again).
Supervision hears the device when the heartbeat is kept; the interval is at most half the
silence timeout less one heartbeat (`GatewayConfig.heartbeat_flush_ms`), so no instance's
supervisor takes a waiting heartbeat's device for silent.

Exact duplicates (a QoS 1 redelivery, or a resend whose ack was lost) are kept once and
acked every time: the device keeps an alert until it sees `received`.

Replay protection rests on the sequence number; the time window only flags (the rule is in
`protocol.replay`). A message with a fresh sequence number and a timestamp outside the
window is kept and forwarded with its `clock_skew_ms`, and its device gets a `sync`; so
does a device whose message is refused with a number below its high-water mark (it lost
its counter). Syncs are limited to one per device and slot every `SYNC_EVERY_MS`, the
slot being what asked for it: `clock` (only a fresh sequence number, the device's own new
signature, can ask for that one), `sequence` for a message dated inside the window, and
`sequence-stale` for one dated outside it, which is what a replay of an old capture looks
like. Replaying old messages can use up only that last slot: never the sync a bell that
lost its counter (its messages carry the time) or its clock needs.

Status `offline` is the device's MQTT last will, which the broker publishes for it after
an unclean disconnect. The device signs it when it connects, so by the time it arrives
its sequence number is old and its timestamp may be hours old: the seq and time-window
checks cannot apply. It is still verified like every message (registered, not revoked,
signed by the device, on its own topic), and then:
- a retained copy is history, not news (the broker replays it to every new subscriber):
  refused as stale;
- a timestamp ahead of our clock beyond the window is refused: a will is never signed in
  the future (a bell whose clock runs that far ahead loses only the will's speed: its other
  messages are kept, so the heartbeat timeout reports it offline);
- its sequence number must not be below that of the last will accepted from the device:
  a will from an earlier run of the agent cannot be replayed after a later one was seen;
  the same will, which the broker sends after every unclean disconnect of one run, passes
  (this floor lives in memory: after a gateway restart the first will is taken as it is);
- it never moves the high-water mark and never counts as hearing from the device.
Why that is safe: only the device's own broker identity may publish on its `up` topics
(ACL on the certificate CN), so a replay needs the device's credentials or the broker.
What a replayed will can do is mark an online device offline: the next heartbeat (at most
one interval later) brings it back with an `online` event. The will only speeds up what
the heartbeat timeout decides anyway; it can never hide an alert or suppress an event.
"Newer than the last status seen" would not work: the agent signs its will once per run,
before the `online` it sends at each connect, so every genuine will is older than that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.logs import LogLimiter
from ansimi.mqtt import Message as MqttMessage
from gateway.downlink import Downlink
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.secondary import SecondaryPathWatch
from gateway.store import Device, DeviceReader, Incoming, IntakeStore, StoreDown
from gateway.supervise import Supervisor
from protocol.clock import wall_ms
from protocol.envelope import Opened, open_from_device
from protocol.errors import Oversized, ProtocolError, Replay, Stale, UnknownSigner
from protocol.jws import MAX_TOKEN_BYTES
from protocol.keys import public_key_from_b64
from protocol.messages import (
    ACK_STAGES,
    AckStage,
    AlertMessage,
    CancelMessage,
    Heartbeat,
    HeartbeatMessage,
    Message,
    Rtc,
    StatusMessage,
    Sync,
    SyncReason,
)
from protocol.replay import check_sequence, clock_skew_ms, sync_next_seq
from protocol.topics import parse_topic

_Told = TypeVar("_Told")  # what a consumer of kept messages is told

log = logging.getLogger(__name__)

# Messages the device keeps in its outbox until it sees `received` for them.
ACKED_TYPES = frozenset({"alert", "cancel", "health"})
# Messages that become events (and are forwarded); the rest only move the high-water mark.
KEPT_TYPES = frozenset({"alert", "cancel", "health"})
# At most one sync per device and slot (see the module docstring) in this interval: a
# replayed flood must not become one to a bell.
SYNC_EVERY_MS = 5_000
SyncSlot = Literal["clock", "sequence", "sequence-stale"]


# Refusals are logged once per device and reason in this interval; the metric counts all.
LOG_EVERY_MS = 60_000


class UnknownDevice(GatewayError, UnknownSigner):
    reason = "unknown_device"


class Revoked(GatewayError, ProtocolError, PermissionError):
    reason = "revoked"


class Registry:
    """Device keys and high-water marks, cached in memory in front of the store.

    Empty until `reload()`. With several gateway instances, another one may register or
    revoke a device, or accept a device's newer messages: `watch()` re-reads the store now
    and then, so this instance follows within that interval.
    """

    def __init__(self, store: DeviceReader) -> None:
        self._store = store
        self._devices: dict[str, Device] = {}
        self._keys: dict[str, Ed25519PublicKey] = {}
        self.high_water: dict[str, int] = {}
        # bumped by refresh(): a reload that started before it must not undo it
        self._generation = 0

    def device_ids(self) -> list[str]:
        """Every device known and not revoked, as last loaded."""
        return [d for d, device in self._devices.items() if not device.revoked]

    async def reload(self) -> None:
        self._swap(self._parsed(await self._store.devices()))

    def _parsed(self, devices: list[Device]) -> list[tuple[Device, Ed25519PublicKey]]:
        """Every device with its key; keys already parsed are reused."""
        keys = self._keys
        known_devices = self._devices
        loaded = []
        for d in devices:
            known = known_devices.get(d.device_id)
            key = keys.get(d.device_id)
            if key is None or known is None or known.public_key != d.public_key:
                key = public_key_from_b64(d.public_key)
            loaded.append((d, key))
        return loaded

    def _swap(self, loaded: list[tuple[Device, Ed25519PublicKey]]) -> None:
        self._devices = {d.device_id: d for d, _ in loaded}
        self._keys = {d.device_id: key for d, key in loaded}
        for d, _ in loaded:
            if d.high_water is not None:
                self.high_water[d.device_id] = max(
                    d.high_water, self.high_water.get(d.device_id, -1)
                )

    async def watch(self, interval_s: float) -> None:
        """Reload every `interval_s` until cancelled; a failed reload waits for the next."""
        while True:
            await asyncio.sleep(interval_s)
            generation = self._generation
            try:
                devices = await self._store.devices()
            except Exception:
                log.exception("registry: reload failed; keeping what we have")
                continue
            if generation == self._generation:
                self._swap(self._parsed(devices))

    async def refresh(self, device_id: str) -> None:
        """Re-read one device (registered, revoked): in effect for its next message."""
        self._generation += 1
        device = await self._store.device(device_id)
        if device is None:
            self._devices.pop(device_id, None)
            self._keys.pop(device_id, None)
            return
        self._keys[device_id] = public_key_from_b64(device.public_key)
        self._devices[device_id] = device

    def device(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def resolve(self, kid: str) -> Ed25519PublicKey:
        key = self._keys.get(kid)
        if key is None:
            raise UnknownDevice(f"no registered device {kid!r}: enrol it with `ansimi provision`")
        return key


class KeptHeartbeat(NamedTuple):
    """A heartbeat kept, with its body as the intake parsed it: nothing after the intake
    parses it again."""

    device_id: str
    ts_ms: int
    body: Heartbeat
    # when the gateway got it (a heartbeat may wait up to heartbeat_flush_ms to be kept);
    # None: just now
    arrived_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _Checked:
    opened: Opened
    device: Device
    last_will: bool = False
    # the device's clock minus ours when outside the window: kept, forwarded flagged
    clock_skew_ms: int | None = None


class _MaybeResent(Exception):
    """Failed the replay check, but may be a resend of something kept: the store decides."""

    def __init__(self, checked: _Checked, refusal: ProtocolError) -> None:
        self.checked = checked
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class _Kept:
    item: Incoming
    fresh: bool
    forwarded: bool
    # the store refused it (an id of another device): not acked, not forwarded
    refused: str | None = None
    # an alert that joined an incident an operator has moved on: that stage, for the bell
    caught_up: AckStage | None = None


class Intake:
    def __init__(
        self,
        store: IntakeStore,
        registry: Registry,
        downlink: Downlink,
        metrics: Metrics,
        *,
        route: Callable[[str], tuple[str, ...]],
        window_ms: int,
        max_bytes: int = MAX_TOKEN_BYTES,
        batch_max: int = 500,
        queue_max: int = 5_000,
        on_backlog: Callable[[bool], None] | None = None,
        clock_ms: Callable[[], int] | None = None,
        on_kept: Callable[[list[Incoming]], None] | None = None,
        supervisor: Supervisor | None = None,
        on_rtc: Callable[[str, Rtc], None] | None = None,
        secondary: SecondaryPathWatch | None = None,
        on_probe: Callable[[MqttMessage], bool] | None = None,
        on_heartbeats: Callable[[list[KeptHeartbeat]], None] | None = None,
        heartbeat_flush_ms: int = 0,
    ) -> None:
        self._store = store
        self._registry = registry
        self._downlink = downlink
        self._metrics = metrics
        self._route = route
        self._window_ms = window_ms
        self._max_bytes = max_bytes
        self._batch_max = batch_max
        self._clock_ms = clock_ms or wall_ms
        self._on_kept = on_kept
        self._supervisor = supervisor
        # the video hub: rtc offers and byes, once checked and their high-water mark kept
        self._on_rtc = on_rtc
        # judges the SMS path's health each heartbeat carries (gateway/secondary.py)
        self._secondary = secondary
        # the gateway's intake probes (gateway/health.py): True when it took the message
        self._on_probe = on_probe
        # each device's last health and clock drift (gateway/fleethealth.py)
        self._on_heartbeats = on_heartbeats
        # heartbeats checked and waiting to be kept (see the module docstring); 0: none wait
        self._heartbeat_flush_ms = heartbeat_flush_ms
        # since when nothing could be kept (every commit failed), and since when the commit
        # in flight has been waiting: /healthz's store path (`store_stuck_since_ms`)
        self._failing_since_ms: int | None = None
        self._committing_since_ms: int | None = None
        self._waiting_beats: list[Incoming] = []
        self._waiting_bodies: dict[tuple[str, str], tuple[Heartbeat, int]] = {}
        self._waiting_since_ms = 0
        self._newest_beat_ms = 0
        # set when the waiting heartbeats are due (their interval passed): one timer a flush,
        # not one a wake-up (heartbeats arrive a few at a time, each few waking the intake)
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_due = False
        self._flushing: asyncio.Future[None] | None = None  # the flush being kept
        self._queue: list[MqttMessage] = []
        self._wake = asyncio.Event()
        # at queue_max messages waiting, on_backlog(True) (the gateway stops reading from
        # the broker); at half of it, on_backlog(False)
        self._queue_max = queue_max
        self._on_backlog = on_backlog
        self._behind = False
        # highest last-will sequence number accepted per device (see the module docstring)
        self._will_floor: dict[str, int] = {}
        # syncs a batch calls for (device -> the message and why), sent once it is kept
        self._syncs: dict[tuple[str, SyncSlot], tuple[Message, SyncReason]] = {}
        self._last_sync_ms: dict[tuple[str, SyncSlot], int] = {}
        # per (device, reason): a device that floods us with bad messages must not flood
        # the log too
        self._log_limit = LogLimiter(LOG_EVERY_MS, lambda: self._clock_ms())

    def submit(self, message: MqttMessage) -> None:
        """Called for every uplink MQTT message, on the loop, without blocking."""
        if self._on_probe is not None and self._on_probe(message):
            return  # a probe: not a device's message, so not checked, kept or refused here
        self._queue.append(message)
        if not self._behind and len(self._queue) >= self._queue_max:
            self._set_behind(True)
        self._wake.set()

    def _set_behind(self, behind: bool) -> None:
        self._behind = behind
        self._metrics.intake_paused.set(1 if behind else 0)
        if behind:
            log.warning(
                "intake: %d messages waiting; reading from the broker paused until %d are left",
                len(self._queue),
                self._queue_max // 2,
            )
        else:
            log.warning("intake: caught up (%d waiting); reading again", len(self._queue))
        if self._on_backlog is not None:
            self._on_backlog(behind)

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    batch = self._queue[: self._batch_max]
                    del self._queue[: self._batch_max]
                    self._metrics.intake_queue.set(len(self._queue))
                    await self.process(batch)
                    if self._behind and len(self._queue) <= self._queue_max // 2:
                        self._set_behind(False)
                self._metrics.intake_queue.set(0)
                if self._flush_due:
                    await self.flush_heartbeats()  # nothing flushed them within the interval
        finally:
            # a clean stop keeps what waits (the store closes after this task), and first
            # lets a flush it interrupted finish
            try:
                if self._flushing is not None and not self._flushing.done():
                    await self._flushing
                await self.flush_heartbeats()
            except Exception:
                log.exception("intake: cannot keep the waiting heartbeats at stop")

    def _heartbeats_due(self) -> None:
        self._flush_due = True
        self._wake.set()

    async def flush_heartbeats(self) -> None:
        """Keep the heartbeats that wait, in one transaction."""
        beats, bodies = self._waiting_beats, self._waiting_bodies
        self._flush_due = False
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not beats:
            return
        self._waiting_beats, self._waiting_bodies = [], {}
        # last seen as of the newest: at most one interval late, never early (an early one
        # could let another instance's supervisor take the device for silent)
        flushing = asyncio.ensure_future(self._keep(beats, self._newest_beat_ms, bodies))
        # shielded: a stop that cancels the intake mid-commit must not cancel the commit (on
        # PostgreSQL that rolled it back, and a clean stop lost the interval's liveness); run's
        # `finally` waits for it
        self._flushing = flushing
        await asyncio.shield(flushing)
        self._flushing = None

    async def process(self, batch: list[MqttMessage]) -> None:
        """Check, keep and ack one batch; never raises for anything a message contains."""
        now_ms = self._clock_ms()
        checked: list[_Checked] = []
        in_batch: set[tuple[str, str]] = set()
        maybe: list[tuple[MqttMessage, _MaybeResent]] = []
        for message in batch:
            try:
                one = self._check(message, now_ms, in_batch)
            except _MaybeResent as resent:
                maybe.append((message, resent))
                continue
            except ProtocolError as exc:
                self._reject(message, exc)
                continue
            except Exception:
                # A bug here must cost one message, never the gateway.
                self._metrics.rejected.labels("internal").inc()
                log.exception("intake: unexpected error on %s", _device_of(message.topic))
                continue
            checked.append(one)
            in_batch.add((one.opened.message.device, one.opened.message.id))
        if maybe:
            checked += await self._resent(maybe, now_ms)
        # A last will followed in the same batch by news from its device is already out
        # of date: the device has reconnected.
        last_heard = {c.opened.message.device: i for i, c in enumerate(checked)}
        wills = [
            c.device.device_id
            for i, c in enumerate(checked)
            if c.last_will and last_heard[c.device.device_id] == i
        ]
        kept = [c for c in checked if not c.last_will]
        if self._supervisor is not None:
            # Signed by the device: it is alive, whether or not the store can keep the message
            # (a full disk must not turn every bell whose heartbeats it could not write into
            # an offline report once it can write again), and whether it is written now or
            # with the next flush of heartbeats.
            for c in kept:
                self._supervisor.heard(c.device.device_id, now_ms)
        if self._heartbeat_flush_ms > 0:
            kept = self._hold_heartbeats(kept, now_ms)
        if kept:
            # the heartbeats' bodies as parsed, so nothing downstream parses them again, and
            # when they came
            beats = {
                (c.opened.message.device, c.opened.message.id): (c.opened.message.body, now_ms)
                for c in kept
                if isinstance(c.opened.message, HeartbeatMessage)
            }
            await self._keep([self._incoming(c) for c in kept], now_ms, beats)
        if self._waiting_beats and (
            len(self._waiting_beats) >= self._batch_max
            or now_ms - self._waiting_since_ms >= self._heartbeat_flush_ms
            # a will comes after its device's waiting heartbeats: they must not cancel it
            or wills
        ):
            await self.flush_heartbeats()
        if self._supervisor is not None and wills:
            await self._supervise(self._supervisor.last_will, wills)
        self._send_syncs(now_ms)

    def _hold_heartbeats(self, checked: list[_Checked], now_ms: int) -> list[_Checked]:
        """Put the heartbeats aside to be kept at the next flush; the rest, to keep now."""
        rest = []
        for c in checked:
            msg = c.opened.message
            if isinstance(msg, HeartbeatMessage):
                if not self._waiting_beats:
                    self._waiting_since_ms = now_ms
                    self._flush_timer = asyncio.get_running_loop().call_later(
                        self._heartbeat_flush_ms / 1000, self._heartbeats_due
                    )
                self._waiting_beats.append(self._incoming(c))
                self._waiting_bodies[msg.device, msg.id] = (msg.body, now_ms)
                self._newest_beat_ms = now_ms
            else:
                rest.append(c)
        return rest

    async def _resent(
        self, maybe: list[tuple[MqttMessage, _MaybeResent]], now_ms: int
    ) -> list[_Checked]:
        """Those already kept are resends (to be re-acked); the rest are replays."""
        pairs = [(r.checked.device.device_id, r.checked.opened.message.id) for _, r in maybe]
        try:
            known = await self._known(pairs)
        except Exception:
            log.exception("intake: cannot look up %d resent messages", len(maybe))
            known = [False] * len(maybe)
        resends = []
        for (message, resent), is_known in zip(maybe, known, strict=True):
            if is_known:
                resends.append(resent.checked)  # the device missed our ack: ack again
            else:
                self._want_sync_if_behind(message, resent.checked.opened.message, now_ms)
                self._reject(message, resent.refusal)
        return resends

    async def _known(self, pairs: list[tuple[str, str]]) -> list[bool]:
        found = []
        for device_id, event_id in pairs:
            event = await self._store.event(event_id)
            found.append(event is not None and event.device_id == device_id)
        return found

    async def _keep(
        self,
        incoming: list[Incoming],
        now_ms: int,
        heartbeats: dict[tuple[str, str], tuple[Heartbeat, int]],
    ) -> None:
        """Commit and ack `incoming`; `heartbeats`: the body and arrival of each of its
        heartbeats by (device, message id), since an id is the device's to choose and another
        device may send the same one (the store refuses that one, but both are in the batch)."""
        kept, came_online = await self._commit(incoming, now_ms)
        self._metrics.intake_batch.observe(len(incoming))
        forwarded: list[Incoming] = []
        accepted: Counter[str] = Counter()
        duplicates = 0
        # the batch's acks leave together, in one write pass, once all are sealed
        with self._downlink.batch():
            for one in kept:
                item = one.item
                if one.refused is not None:
                    self._refuse(
                        item.device_id,
                        one.refused,
                        f"{item.type} {item.event_id} uses or names an event id of another device",
                    )
                    continue
                if one.fresh:
                    accepted[item.type] += 1
                else:
                    duplicates += 1
                if one.forwarded:
                    forwarded.append(item)
                if item.type in ACKED_TYPES:
                    self._downlink.ack(item.device_id, item.event_id, "received")
                if one.caught_up is not None:
                    # the desk acknowledged this bell's incident before this alert came: the
                    # bell hears it for this alert too (a bell pressed again after its own
                    # cancel knows only this one)
                    self._downlink.ack(item.device_id, item.event_id, one.caught_up)
                if item.type == "rtc" and one.fresh and self._on_rtc is not None:
                    self._tell("rtc", self._hand_rtc, item)
        # counted once a batch: a labelled counter's lookup and lock cost per message
        for type_, n in accepted.items():
            self._metrics.accepted.labels(type_).inc(n)
        if duplicates:
            self._metrics.duplicates.inc(duplicates)
        if self._supervisor is not None and came_online:
            await self._supervise(self._supervisor.came_online, came_online)
        beats = [
            KeptHeartbeat(
                k.item.device_id, k.item.ts_ms, *heartbeats[k.item.device_id, k.item.event_id]
            )
            for k in kept
            if k.item.type == "heartbeat"
        ]
        if self._secondary is not None:
            try:
                await self._secondary.heartbeats([(b.device_id, b.body) for b in beats])
            except Exception:
                # like supervision: its failure (the store full, say) must not stop intake
                log.exception("intake: secondary path supervision failed")
        if self._on_heartbeats is not None and beats:
            self._tell("heartbeats", self._on_heartbeats, beats)
        if forwarded and self._on_kept is not None:
            self._tell("kept", self._on_kept, forwarded)

    def _tell(self, consumer: str, call: Callable[[_Told], object], told: _Told) -> None:
        """Hand what was kept to its consumers (fleet health, remote config, rollouts, test
        presses, video, the forwarder's wake-up). The messages are kept and acked already:
        a consumer's bug costs its own view, never the intake (an exception here used to end
        the intake's task, and with it every bell's alerts)."""
        try:
            call(told)
        except Exception:
            self._metrics.consumer_failures.labels(consumer).inc()
            log.exception("intake: the %s consumer failed on what was kept", consumer)

    def _hand_rtc(self, item: Incoming) -> None:
        assert self._on_rtc is not None
        self._on_rtc(item.device_id, Rtc.model_validate_json(item.body_json))

    async def _supervise(
        self, step: Callable[[list[str]], Awaitable[object]], device_ids: list[str]
    ) -> None:
        """News for supervision; its failure (the store full, say) must not stop intake."""
        try:
            await step(device_ids)
        except Exception:
            log.exception("intake: supervision of %s failed", ", ".join(device_ids[:5]))

    def store_stuck_since_ms(self) -> int | None:
        """Since when the store has kept nothing: every commit failed, or the one in flight
        has not come back (a lock held for long, a database server gone silent)."""
        times = [t for t in (self._failing_since_ms, self._committing_since_ms) if t is not None]
        return min(times, default=None)

    async def _commit(self, incoming: list[Incoming], now_ms: int) -> tuple[list[_Kept], list[str]]:
        """One group commit; if it fails, each message alone, so one bad row costs one message.

        A message that cannot be kept is not acked: its device sends it again.
        """
        self._committing_since_ms = self._clock_ms()
        try:
            return await self._commit_now(incoming, now_ms)
        finally:
            self._committing_since_ms = None

    async def _commit_now(
        self, incoming: list[Incoming], now_ms: int
    ) -> tuple[list[_Kept], list[str]]:
        try:
            done = await self._store.accept_batch(incoming, now_ms)
        except StoreDown as exc:
            # The store as a whole cannot write: one by one would fail alike, each with a
            # traceback (200,000 log lines in a minute of full disk, on that same disk).
            self._keeping(False, now_ms)
            self._metrics.store_errors.inc()
            self._metrics.rejected.labels(exc.reason).inc(len(incoming))
            quiet = self._log_limit.quiet(("(store)", exc.reason), len(incoming))
            if quiet is not None:
                more = LogLimiter.more(quiet)
                log.error("intake: cannot keep %d messages: %s%s", len(incoming), exc, more)
            return [], []
        except Exception:
            self._metrics.store_errors.inc()
            log.exception("intake: group commit of %d messages failed; one by one", len(incoming))
        else:
            self._keeping(True, now_ms)
            kept = [
                _Kept(item, fresh, fwd, refused, _stage(done.caught_up.get(item.event_id)))
                for item, fresh, fwd, refused in zip(
                    incoming, done.fresh, done.forwarded, done.refused, strict=True
                )
            ]
            return kept, done.came_online
        kept = []
        came_online: list[str] = []
        for item in incoming:
            try:
                alone = await self._store.accept_batch([item], now_ms)
            except Exception:
                self._metrics.rejected.labels("internal").inc()
                log.exception("intake: cannot keep a message from %s", item.device_id)
                continue
            caught_up = _stage(alone.caught_up.get(item.event_id))
            kept.append(
                _Kept(item, alone.fresh[0], alone.forwarded[0], alone.refused[0], caught_up)
            )
            came_online += [d for d in alone.came_online if d not in came_online]
        self._keeping(bool(kept), now_ms)
        return kept, came_online

    def _keeping(self, kept_any: bool, now_ms: int) -> None:
        """The store kept something (or nothing at all) of a commit."""
        if kept_any:
            self._failing_since_ms = None
        elif self._failing_since_ms is None:
            self._failing_since_ms = now_ms

    def _check(self, message: MqttMessage, now_ms: int, in_batch: set[tuple[str, str]]) -> _Checked:
        if len(message.payload) > self._max_bytes:
            # before anything else: a flood of huge payloads must cost nothing
            raise Oversized(f"payload is {len(message.payload)} bytes, over {self._max_bytes}")
        topic = parse_topic(message.topic)
        opened = open_from_device(
            message.payload, self._registry.resolve, topic, max_bytes=self._max_bytes
        )
        msg = opened.message
        device = self._registry.device(msg.device)
        if device is None:  # reloaded between resolve() and here
            raise UnknownDevice(f"no registered device {msg.device!r}")
        if device.revoked:
            raise Revoked(f"device {msg.device} is revoked")
        if isinstance(msg, StatusMessage) and msg.body.state == "offline":
            self._check_last_will(message, msg, now_ms)
            return _Checked(opened, device, last_will=True)
        high_water = self._registry.high_water.get(msg.device)
        try:
            check_sequence(high_water, msg.seq)
        except Replay as exc:
            if msg.type not in ACKED_TYPES:
                self._want_sync_if_behind(message, msg, now_ms)
                raise
            if (msg.device, msg.id) in in_batch:
                return _Checked(opened, device)  # twice in one batch: a QoS 1 redelivery
            raise _MaybeResent(_Checked(opened, device), exc) from None
        self._registry.high_water[msg.device] = msg.seq
        # the clock flags, never silences: kept and forwarded with its skew, and a sync
        skew = clock_skew_ms(msg.ts, now_ms, self._window_ms)
        if skew is not None:
            self._metrics.clock_skewed.inc()
            self._want_sync(msg, "clock", now_ms)
        return _Checked(opened, device, clock_skew_ms=skew)

    def _want_sync_if_behind(self, raw: MqttMessage, msg: Message, now_ms: int) -> None:
        """A verified message refused as a replay: if its number is below the high-water
        mark, the device has lost its counter (an exact resend of the newest is not that,
        nor a retained copy the broker replays to every new subscriber: history)."""
        high_water = self._registry.high_water.get(msg.device)
        if not raw.retain and high_water is not None and msg.seq < high_water:
            self._want_sync(msg, "sequence", now_ms)

    def _want_sync(self, msg: Message, reason: SyncReason, now_ms: int) -> None:
        """Queue a sync for this batch, one per device and slot: the latest-dated message
        of the slot is the likeliest to be one the device still remembers (`ref`)."""
        in_window = clock_skew_ms(msg.ts, now_ms, self._window_ms) is None
        slot: SyncSlot = "sequence-stale" if reason == "sequence" and not in_window else reason
        queued = self._syncs.get((msg.device, slot))
        if queued is None or msg.ts >= queued[0].ts:
            self._syncs[(msg.device, slot)] = (msg, reason)

    def _send_syncs(self, now_ms: int) -> None:
        """Tell each device this batch found behind its time or its counter where it stands;
        one per device and slot every SYNC_EVERY_MS (a replaying attacker must not spam a
        bell, nor use up the sync a bell needs)."""
        syncs, self._syncs = self._syncs, {}
        for (device_id, slot), (msg, reason) in syncs.items():
            last = self._last_sync_ms.get((device_id, slot))
            if last is not None and now_ms - last < SYNC_EVERY_MS:
                self._metrics.syncs.labels("limited").inc()
                continue
            self._last_sync_ms[(device_id, slot)] = now_ms
            high_water = self._registry.high_water.get(device_id, msg.seq)
            self._downlink.send(
                device_id, Sync(ref=msg.id, reason=reason, next_seq=sync_next_seq(high_water))
            )
            self._metrics.syncs.labels(reason).inc()
            log.warning(
                "intake: sent %s a sync (%s): its %s",
                device_id,
                reason,
                f"clock is {(msg.ts - now_ms) / 1000:+.1f} s off ours"
                if reason == "clock"
                else f"sequence number {msg.seq} is below our high-water mark {high_water}",
            )

    def _check_last_will(self, raw: MqttMessage, msg: StatusMessage, now_ms: int) -> None:
        """The rules for a status `offline` (the last will): see the module docstring."""
        if raw.retain:
            raise Stale(f"retained status of {msg.device}: a copy from the past, not news")
        if msg.ts > now_ms + self._window_ms:
            raise Stale(f"status of {msg.device} is signed {msg.ts - now_ms} ms in the future")
        floor = self._will_floor.get(msg.device)
        if floor is not None and msg.seq < floor:
            raise Replay(
                f"last will of {msg.device} has seq {msg.seq}, below the {floor} of a later run"
            )
        self._will_floor[msg.device] = msg.seq

    def _incoming(self, checked: _Checked) -> Incoming:
        msg = checked.opened.message
        kept = msg.type in KEPT_TYPES
        power = msg.body.power if isinstance(msg, HeartbeatMessage) else None
        refs: tuple[str, ...] = ()
        if isinstance(msg, CancelMessage):
            refs = (msg.body.alert_id,)
        elif isinstance(msg, AlertMessage) and msg.body.linked_to is not None:
            refs = (msg.body.linked_to,)
        return Incoming(
            event_id=msg.id,
            device_id=msg.device,
            seq=msg.seq,
            type=msg.type,
            ts_ms=msg.ts,
            body_json=msg.body.model_dump_json(),
            jws=checked.opened.token,
            # a heartbeat may become a power event, so it carries its routing too
            centres=self._route(checked.device.district) if kept or power else (),
            kept=kept,
            power=power,
            refs=refs,
            clock_skew_ms=checked.clock_skew_ms,
        )

    def _reject(self, message: MqttMessage, exc: ProtocolError) -> None:
        # Only the device id from the topic: the payload may carry personal data.
        self._refuse(_device_of(message.topic), exc.reason, str(exc))

    def _refuse(self, device: str, reason: str, detail: str) -> None:
        """Count a refusal; log it, at most once per device and reason an interval."""
        self._metrics.rejected.labels(reason).inc()
        quiet = self._log_limit.quiet((device, reason))
        if quiet is None:
            return
        more = LogLimiter.more(quiet)
        log.warning("intake: refused a message from %s: %s%s", device, reason, more)
        log.debug("intake: refusal detail for %s: %s", device, detail)


_STAGE_OF: dict[str | None, AckStage] = {s: s for s in ACK_STAGES}


def _stage(stage: str | None) -> AckStage | None:
    """The store's stage as typed; None for most messages, which nothing caught up."""
    return _STAGE_OF.get(stage)


def _device_of(topic: str) -> str:
    parts = topic.split("/")
    candidate = parts[2] if len(parts) > 2 else "?"
    return candidate[:64] if candidate.replace("-", "").isalnum() else "(invalid id)"
