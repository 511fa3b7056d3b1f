"""Health that tells the truth: each path proves itself; /healthz and the watchdog say so.

The paths, and what a failure of each means:

- **intake** (the broker, our subscription, our session, the loop): proven end to end by
  probes the gateway publishes to itself every `health.probe_s` (protocol/probe.py) on a
  topic its own uplink must deliver (gateway/uplink.py: the MQTT subscription, or the AMQP
  queue on a RabbitMQ cluster; the probe goes out over MQTT either way, so it proves both).
  No probe heard for `health.intake_deaf_s`: the intake is *deaf*, and /healthz answers
  503 naming `intake` (and `mqtt` while the broker connection is down): whatever the
  cause, alerts are not coming in.
  The repair ladder, while connected, one rung per deafness interval: resubscribe (a broker
  may keep our session and forget its shared subscription: FIELD-NOTES), then reconnect (a
  black-holed link looks connected until the keepalive gives up, ~2x keepalive); past
  those, resubscribe at each interval until a probe is heard (no further reconnect: the
  next rung is systemd's restart, below, and a new connection would postpone it).
  The systemd watchdog is a different question: not "is it broken?" but "would a restart of
  the gateway help?". A restart interrupts forwarding the stored alerts to the centres, and
  it brings back no broker. So the pings stop only where a restart can help:
  - *connected yet deaf past the ladder*: the broker accepts our connection (so it is up),
    resubscribe and reconnect were both tried, and a whole deafness interval of the
    connection made since has passed without a probe: something in this process is wrong
    (its session, or an intake that stopped reading: a full intake queue pauses reading
    from the broker, so a wedged intake is deaf too once its queue fills; the probe is
    taken before that queue, so a wedged writer with a short queue is not seen here).
    With WatchdogSec=30 that is a restart ~1 min into the deafness.
  - *the event loop blocked*: the pings run on it, so they stop by themselves.
  While the broker is down or unreachable (not connected, or reconnecting), the pings go
  on, deaf as we are: the session reconnects by itself, and meanwhile the gateway keeps
  forwarding what it has stored. A connection coming back starts the count again.
  Several instances in one shared subscription group: the broker hands each probe to one
  member of the group, not necessarily to its sender. So hearing *any* probe of this gateway,
  this instance's or a sibling's, within the bound counts as this instance's intake being
  alive: it proves the broker delivers this instance's share of the uplink. Every instance
  publishes probes, so each hears about as many as it sends, however many siblings there are;
  an instance whose share the broker stopped delivering hears none and goes red alone.
- **forwarding**, per centre: a centre failing (unreachable, or refusing) for
  `health.centre_down_s` is *degraded*: /healthz names it, since when and its last error
  class, still with status 200, and the watchdog stays green: a gateway restart does not
  bring a centre back, and every delivery keeps its place in the durable outbox meanwhile.
- **disk**: free space where the database lives below `disk_reserve_mb` is *degraded*
  (200), with one `disk_low` event to the centres per episode; back above the reserve plus
  a quarter (hysteresis, so a file system hovering at the line does not flap), one
  `disk_ok`. Alerts are still accepted: the reserve is there so that they fit.

Anything failing: 503. Degraded and nothing failing: 200 with `"status": "degraded"`.
The body says which path, so a probe of /healthz tells an operator where to look; the
details (which centre, since when, the disk's figures) only with an API token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prometheus_client import Counter, Gauge

from ansimi.mqtt import Message as MqttMessage
from gateway.forward import Failing
from gateway.metrics import Metrics
from gateway.store import HealthStore, Incoming
from protocol.clock import Clock, wall_ms
from protocol.errors import ProtocolError, UnknownSigner, clip
from protocol.jws import Signer
from protocol.probe import open_probe, probe_sender, probe_topic, seal_probe

log = logging.getLogger(__name__)

Status = Literal["ok", "degraded", "failing"]
DiskState = Literal["disk_low", "disk_ok"]

# Refused probes are logged at most this often; the metric counts all.
LOG_EVERY_MS = 60_000
# resubscribe, reconnect: past both (and still deaf), a restart is the next repair
LADDER_RUNGS = 2
# Back to ok only above reserve x this: the hysteresis of the disk_low episode.
DISK_RECOVER_FACTOR = 1.25


class IntakeProbe:
    """Sends probes, hears them back (`offer`, the intake's hook), and repairs deafness."""

    def __init__(
        self,
        signer: Signer,
        instance: str,
        publish: Callable[[str, bytes], Awaitable[None]],
        metrics: Metrics,
        *,
        connected: Callable[[], bool],
        resubscribe: Callable[[], Awaitable[object]],
        reconnect: Callable[[], None],
        every_ms: int,
        deaf_after_ms: int,
        clock_ms: Clock = wall_ms,
    ) -> None:
        self._signer = signer
        self._instance = instance
        self._publish = publish
        self._metrics = metrics
        self._connected = connected
        self._resubscribe = resubscribe
        self._reconnect = reconnect
        self.every_ms = every_ms
        self.deaf_after_ms = deaf_after_ms
        self._clock_ms = clock_ms
        self._topic = probe_topic(signer.kid)
        self._started_ms: int | None = None
        self.heard_ms: int | None = None  # the last probe heard, own or a sibling's
        self._repairs = 0  # since the last probe heard
        # since when the session has been connected (its connect hooks); None: not now
        self._connected_since_ms: int | None = None
        self._told_restart = False  # the watchdog's pings withheld: logged once per deafness
        self._next_repair_ms: int | None = None  # set while deaf
        self._repairing: asyncio.Task[None] | None = None
        self._log_refusal_after_ms = 0
        self._sent: asyncio.Future[None] | None = None
        registry = metrics.registry
        self.probes = Counter(
            "ansimi_intake_probes_total",
            "Intake probes heard back: sent by this instance (own) or a sibling, too late to"
            " count, or refused (not signed by this gateway)",
            ["result"],
            registry=registry,
        )
        self.repairs = Counter(
            "ansimi_intake_repairs_total",
            "Repairs tried while the intake was deaf (no probe heard in the bound)",
            ["action"],
            registry=registry,
        )
        for result in ("own", "sibling", "late", "refused"):
            self.probes.labels(result)
        for action in ("resubscribe", "reconnect"):
            self.repairs.labels(action)

    def _resolve(self, kid: str) -> Ed25519PublicKey:
        # only this gateway's own key: siblings are instances of the same gateway
        if kid != self._signer.kid:
            raise UnknownSigner(f"a probe signed by {clip(kid)}, not by this gateway")
        return self._signer.public_key

    # ---- hearing ------------------------------------------------------------------------

    def offer(self, message: MqttMessage) -> bool:
        """The intake's hook, for every uplink message: True if it was on a probe topic."""
        sender = probe_sender(message.topic)
        if sender is None:
            return False
        now = self._clock_ms()
        try:
            probe = open_probe(message.payload, self._resolve, sender)
        except ProtocolError as exc:
            self._refused(sender, exc, now)
            return True
        if abs(now - probe.ts) > self.deaf_after_ms:
            # ours, but it proves nothing about now (it waited in a black-holed link, or is
            # replayed): counted apart, not as a refusal, and it does not end a deafness
            self.probes.labels("late").inc()
            log.debug("health: a probe signed %d ms ago came back", now - probe.ts)
            return True
        self.probes.labels("own" if probe.instance == self._instance else "sibling").inc()
        if self._next_repair_ms is not None:
            log.warning(
                "health: the intake hears again (%d repairs tried, silent %.1f s)",
                self._repairs,
                self.silent_ms(now) / 1000,
            )
        self.heard_ms = now if self.heard_ms is None else max(self.heard_ms, now)
        self._repairs = 0
        self._next_repair_ms = None
        self._told_restart = False
        return True

    def _refused(self, sender: str, exc: ProtocolError, now: int) -> None:
        self.probes.labels("refused").inc()
        self._metrics.rejected.labels(exc.reason).inc()
        if now >= self._log_refusal_after_ms:
            self._log_refusal_after_ms = now + LOG_EVERY_MS
            log.warning("health: refused a probe on the topic of %s: %s", clip(sender, 64), exc)

    def silent_ms(self, now: int) -> int:
        """How long no probe has been heard: since the start if none yet."""
        since = self.heard_ms if self.heard_ms is not None else self._started_ms
        return 0 if since is None else max(0, now - since)

    def deaf(self, now: int) -> bool:
        return self.silent_ms(now) > self.deaf_after_ms

    def proven(self, now: int) -> bool:
        """A probe was heard within the bound (at start-up: not yet proven, but not deaf)."""
        return self.heard_ms is not None and not self.deaf(now)

    def connection_up(self, now: int) -> None:
        """The session (re)connected: a deafness past the ladder counts from here."""
        self._connected_since_ms = now

    def connection_down(self) -> None:
        self._connected_since_ms = None

    def restart_may_help(self, now: int) -> bool:
        """Connected, yet deaf after the repair ladder ran its course (the module docstring):
        both rungs tried, and a whole deafness interval of the latest connection without a
        probe. Never while disconnected or reconnecting: a restart brings back no broker."""
        since = self._connected_since_ms
        return (
            self._connected()
            and since is not None
            and self._repairs >= LADDER_RUNGS
            and self.deaf(now)
            and now - since >= self.deaf_after_ms
        )

    # ---- sending and repairing ---------------------------------------------------------

    def start(self, now: int) -> None:
        """The uplink subscription is in place: the deafness bound counts from now."""
        if self._started_ms is None:
            self._started_ms = now

    async def tick(self, now: int) -> None:
        self.start(now)
        if self._connected():
            # QoS 0: a probe is worth nothing later, so none queues while we are away
            self._sent = asyncio.ensure_future(
                self._publish(self._topic, seal_probe(self._signer, self._instance, now))
            )
            self._sent.add_done_callback(_ignore_result)
        if not self.deaf(now):
            return
        if self._next_repair_ms is None:
            log.error(
                "health: the intake is deaf: no probe heard for %.1f s (bound %.1f s); check"
                " the broker, and that its ACL lets %s write %s",
                self.silent_ms(now) / 1000,
                self.deaf_after_ms / 1000,
                self._signer.kid,
                self._topic,
            )
            self._next_repair_ms = now
        if self.restart_may_help(now) and not self._told_restart:
            self._told_restart = True
            log.error(
                "health: connected, yet deaf for %.1f s after resubscribing and reconnecting:"
                " watchdog pings withheld, so that systemd restarts the gateway",
                self.silent_ms(now) / 1000,
            )
        busy = self._repairing is not None and not self._repairing.done()
        if now < self._next_repair_ms or busy or not self._connected():
            return  # not connected: the session reconnects by itself; nothing to repair yet
        self._next_repair_ms = now + self.deaf_after_ms
        # one reconnect only: another would give the new connection its own deafness
        # interval, and keep the watchdog pinging past the ladder (restart_may_help)
        action = "reconnect" if self._repairs == LADDER_RUNGS - 1 else "resubscribe"
        self._repairs += 1
        self.repairs.labels(action).inc()
        log.warning("health: intake deaf for %.1f s: %s", self.silent_ms(now) / 1000, action)
        self._repairing = asyncio.ensure_future(self._repair(action))

    async def _repair(self, action: str) -> None:
        try:
            if action == "resubscribe":
                await self._resubscribe()
            else:
                self._reconnect()
        except Exception as exc:
            # a black-holed link times the resubscribe out: the next repair reconnects
            log.warning("health: %s failed: %s", action, type(exc).__name__)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.tick(self._clock_ms())
                except Exception:
                    # a bug here must not end the probes (nor, in its task group, the gateway)
                    log.exception(
                        "health: probe round failed; next in %.1f s", self.every_ms / 1000
                    )
                await asyncio.sleep(self.every_ms / 1000)
        finally:
            if self._repairing is not None:
                self._repairing.cancel()


def _ignore_result(future: asyncio.Future[None]) -> None:
    # a QoS 0 publish only fails when the connection is gone: deafness tells that story
    if not future.cancelled():
        future.exception()


class DiskWatch:
    """Free space where the database lives, against the reserve; WAL checkpoints.

    Looked at every `every_s` (a statvfs: microseconds), off the event loop. The reserve is
    sized for far more than that long of alerts, so the intake's commits need not ask.
    The `disk_low`/`disk_ok` event is kept as soon as the state changes, and tried again at
    each look until the store takes it (it fits: that is what the reserve is for).
    """

    def __init__(
        self,
        store: HealthStore,
        reserve_bytes: int,
        metrics: Metrics,
        *,
        make_event: Callable[[DiskState], Incoming | None],
        on_event: Callable[[], None],
        every_s: float = 1.0,
        checkpoint_every_s: float = 60.0,
        clock_ms: Clock = wall_ms,
    ) -> None:
        self._store = store
        self.reserve_bytes = reserve_bytes
        self._make_event = make_event
        self._on_event = on_event
        self._every_s = every_s
        self._checkpoint_every_ms = int(checkpoint_every_s * 1000)
        self._clock_ms = clock_ms
        self.free_bytes: int | None = None
        self.low_since_ms: int | None = None  # set while low
        self._told_low = False  # what the centres were last told
        self._next_checkpoint_ms = 0
        registry = metrics.registry
        self.free_gauge = Gauge(
            "ansimi_disk_free_bytes",
            "Free bytes on the file system of the database, as last looked at",
            registry=registry,
        )
        self.low_gauge = Gauge(
            "ansimi_disk_low",
            "1 while free space is below the reserve (disk_reserve_mb)",
            registry=registry,
        )
        self.low_gauge.set_function(lambda: 1.0 if self.low else 0.0)

    @property
    def low(self) -> bool:
        return self.low_since_ms is not None

    async def check(self, now: int) -> None:
        free = await self._store.free_bytes()
        if free is None:
            return  # no file system under it (an in-memory store)
        self.free_bytes = int(free)
        self.free_gauge.set(self.free_bytes)
        if not self.low and free < self.reserve_bytes:
            self.low_since_ms = now
            log.error(
                "health: disk low: %.1f MB free, below the %.1f MB reserve: free space where"
                " the database lives",
                free / 1e6,
                self.reserve_bytes / 1e6,
            )
        elif self.low and free >= self.reserve_bytes * DISK_RECOVER_FACTOR:
            self.low_since_ms = None
            log.warning("health: disk space back: %.1f MB free", free / 1e6)
        if self._told_low != self.low:
            await self._tell(now)
        if self.low or now >= self._next_checkpoint_ms:
            # TRUNCATE gives the WAL's space back; while low, at every look
            self._next_checkpoint_ms = now + self._checkpoint_every_ms
            await self._store.checkpoint()

    async def _tell(self, now: int) -> None:
        state: DiskState = "disk_low" if self.low else "disk_ok"
        event = self._make_event(state)
        if event is not None:
            try:
                await self._store.add_site_event(event, now)
            except Exception as exc:
                log.warning("health: cannot keep the %s event yet (%s): next look", state, exc)
                return
            self._on_event()
        self._told_low = self.low

    async def run(self) -> None:
        while True:
            try:
                await self.check(self._clock_ms())
            except Exception:
                log.exception("health: disk check failed; next look in %.0f s", self._every_s)
            await asyncio.sleep(self._every_s)


@dataclass(frozen=True, slots=True)
class Report:
    status: Status
    body: dict[str, Any]

    @property
    def http_status(self) -> int:
        return 503 if self.status == "failing" else 200

    @property
    def summary(self) -> dict[str, Any]:
        """What anyone may read (/healthz is public): the status and the kinds of path at
        fault. Which centre, since when, and the disk's figures are for token holders: a
        centre out of reach is news an attacker could use too."""
        degraded = sorted({path.split(":", 1)[0] for path in self.body["degraded"]})
        return {k: self.body[k] for k in ("ok", "status", "failing")} | {"degraded": degraded}


_STATUS_LEVEL: dict[Status, int] = {"ok": 0, "degraded": 1, "failing": 2}


STORE_DOWN_AFTER_MS: Final = 6_000


class Health:
    """The gateway's paths put together: /healthz's answer, the watchdog's go, metrics."""

    def __init__(
        self,
        probe: IntakeProbe,
        metrics: Metrics,
        *,
        connected: Callable[[], bool],
        centres: Sequence[str],
        failing_centres: Callable[[], Mapping[str, Failing]],
        centre_down_after_ms: int,
        disk: DiskWatch | None = None,
        store_stuck_since: Callable[[], int | None] = lambda: None,
        clock_ms: Clock = wall_ms,
    ) -> None:
        self._probe = probe
        self._store_stuck_since = store_stuck_since
        self._connected = connected
        self._failing_centres = failing_centres
        self._centre_down_after_ms = centre_down_after_ms
        self._disk = disk
        self._clock_ms = clock_ms
        registry = metrics.registry
        Gauge(
            "ansimi_health_status",
            "What /healthz says: 0 ok, 1 degraded (a centre or the disk), 2 failing (503)",
            registry=registry,
        ).set_function(lambda: _STATUS_LEVEL[self.report().status])
        Gauge(
            "ansimi_intake_probe_silence_seconds",
            "Seconds since an intake probe was last heard back (deaf past health.intake_deaf_s)",
            registry=registry,
        ).set_function(lambda: self._probe.silent_ms(self._clock_ms()) / 1000)
        down = Gauge(
            "ansimi_centre_down",
            "1 while a centre has been failing (unreachable or refusing) past health.centre_down_s",
            ["centre"],
            registry=registry,
        )
        for name in centres:
            down.labels(name).set_function(self._is_down(name))

    def _is_down(self, name: str) -> Callable[[], float]:
        return lambda: float(name in self._down())

    def _down(self) -> dict[str, Failing]:
        now = self._clock_ms()
        return {
            name: failing
            for name, failing in self._failing_centres().items()
            if now - failing.since_ms >= self._centre_down_after_ms
        }

    def watchdog_ok(self) -> bool:
        """Ping systemd's watchdog? Yes unless a restart may help (the module docstring): not
        merely deaf, which a broker outage is too."""
        return not self._probe.restart_may_help(self._clock_ms())

    def report(self) -> Report:
        now = self._clock_ms()
        connected = self._connected()
        failing: list[str] = []
        degraded: list[str] = []
        if not connected:
            failing.append("mqtt")
        if not self._probe.proven(now):
            failing.append("intake")
        # the store keeping nothing this long (every commit failing, or one not coming back):
        # alerts are not kept, nor acked, however well the broker delivers them
        store_since = self._store_stuck_since()
        store_down = store_since is not None and now - store_since >= STORE_DOWN_AFTER_MS
        if store_down:
            failing.append("store")
        heard = self._probe.heard_ms
        body: dict[str, Any] = {
            "store": {"ok": not store_down, "stuck_since_ms": store_since},
            "mqtt": "connected" if connected else "disconnected",
            "intake": {
                "ok": "intake" not in failing,
                "last_probe_ms": heard,
                "silent_s": round(self._probe.silent_ms(now) / 1000, 1),
                "deaf_after_s": self._probe.deaf_after_ms / 1000,
            },
        }
        centres = {}
        for name, failing_centre in sorted(self._down().items()):
            degraded.append(f"centre:{name}")
            centres[name] = {
                "ok": False,
                "failing_since_ms": failing_centre.since_ms,
                # the kind of error only: this route is public, hosts and paths stay in the log
                "error": failing_centre.error.split(":", 1)[0][:60],
            }
        body["centres"] = centres
        disk = self._disk
        if disk is not None and disk.free_bytes is not None:
            if disk.low:
                degraded.append("disk")
            body["disk"] = {
                "ok": not disk.low,
                "free_mb": round(disk.free_bytes / 1e6, 1),
                "reserve_mb": round(disk.reserve_bytes / 1e6, 1),
                "low_since_ms": disk.low_since_ms,
            }
        status: Status = "failing" if failing else "degraded" if degraded else "ok"
        return Report(
            status,
            {"ok": not failing, "status": status, "failing": failing, "degraded": degraded, **body},
        )
