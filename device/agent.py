"""The device agent: the composition root that wires the parts and runs them.

Hardware (ports) feeds the behaviour (`device/behaviour.py`, the state machine that
decides what a press means); its effects go to the durable outbox, the MQTT link and the
indicator. Verified acks and commands come back through the link. Everything runs as one
TaskGroup of named tasks on one event loop: no thread per device, so the simulator can run
thousands of agents in a process.

Never mute on the bell's side. The agent's clock is the system clock plus an offset that
the gateway's `sync` corrects (the system clock is never set); a sync also raises the
sequence counter, and everything waiting is signed again and resent (`protocol.replay`).
Storage that fails holds entries in memory and never stops a press going out. What the
gateway should know about the bell itself (clock corrected, outbox recovered, storage
failed or back) goes up as `health` messages, kept until `received` like alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ansimi import sdnotify
from ansimi.logs import DECISION
from device.behaviour import BELL_OF, Behaviour, BehaviourError, Effect, Send, Show, SmsProgress
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.ports import HalError, InputEvent, Pattern
from device.link import Link
from device.observer import AgentObserver
from device.outbox import OUTBOX_BODIES, Entry, Outbox
from device.remote_config import (
    ConfigFailedBefore,
    ConfigRefused,
    RemoteConfig,
    Trial,
    touches_link,
)
from device.renew import BUSY_LOOK_S, Renewal, RenewalFailed, Renewed
from device.sms import UNDELIVERED_FILE, SmsFallback
from device.testpress import TestPresses
from device.update import Updater, UpdateService, agent_version, refused_update
from protocol.clock import Clock, wall_ms
from protocol.ids import new_message_id
from protocol.jws import Signer
from protocol.messages import (
    Ack,
    AckMessage,
    AckStage,
    Alert,
    Body,
    Cancel,
    Command,
    CommandMessage,
    Health,
    Heartbeat,
    Message,
    RtcMessage,
    SecondaryPath,
    SyncMessage,
)
from protocol.remote_config import config_hash

if TYPE_CHECKING:
    from device.video.session import VideoManager

log = logging.getLogger(__name__)

# A sync's time differs from ours by its transit at least: only more than this is corrected.
CLOCK_TOLERANCE_MS = 2_000
STAGE_TEXT: dict[AckStage, str] = {
    "received": "received by the gateway",
    "delivered": "delivered to a control centre",
    "acknowledged": "acknowledged by an operator",
    "dispatched": "help dispatched",
    "closed": "closed by the centre",
}
KEPT_TYPE_NAMES: dict[type[Alert] | type[Cancel] | type[Health], str] = {
    model: name for name, model in OUTBOX_BODIES.items()
}
EventArgs = ParamSpec("EventArgs")


class Agent:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        signer: Signer,
        gateway_key: Ed25519PublicKey,
        hardware: Hardware,
        outbox: Outbox | None = None,
        clock_ms: Clock | None = None,
        monotonic: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        observer: AgentObserver | None = None,
        updater: Updater | None = None,
        device_key: Ed25519PrivateKey | None = None,
    ) -> None:
        # device.toml with the gateway's last good remote config laid over it; `device_key`
        # (the signer's) opens SMS numbers the gateway sealed for this device
        self.remote = RemoteConfig(config, device_key=device_key)
        config = self.remote.effective()
        self.config = config
        self.device_id = config.device.id
        self.hardware = hardware
        self._system_clock_ms = clock_ms or wall_ms
        # what the gateway's sync says our clock is off by; the system clock is left alone
        self.clock_offset_ms = 0
        self._clock_ms = self.now_ms
        self._monotonic = monotonic or time.monotonic
        self._rng = rng or random.Random()
        self._observer = observer or AgentObserver()
        self.outbox = outbox or Outbox(config.device.state_dir / "outbox.db")
        self.outbox.on_storage = self._on_storage
        self.behaviour = Behaviour(
            config.device.kind, config.behaviour, silent=config.device.is_silent
        )
        self.link = Link(
            config,
            signer,
            gateway_key,
            self.outbox,
            self._on_down,
            on_connect=self._link_up,
            on_disconnect=self._link_down,
            clock_ms=self._clock_ms,
        )
        self.link.session.add_link_dead_listener(
            lambda dead: self._tell(self._observer.link_dead, dead)
        )
        self.sms = SmsFallback(
            config,
            hardware.modem,
            self.outbox,
            clock_ms=self._clock_ms,
            on_progress=self._on_sms,
            undelivered_path=config.device.state_dir / UNDELIVERED_FILE,
        )
        # live video: doorbells with a camera only (aiortc and PyAV are imported only then)
        self.video: VideoManager | None = None
        if hardware.camera is not None and config.device.kind == "doorbell":
            from device.video.session import VideoManager

            # the speaker only when talk-back is on (never on a store bell: config refuses it)
            speaker = hardware.speaker if config.video.talkback else None
            microphone = hardware.microphone if config.video.microphone else None
            self.video = VideoManager(
                config.video,
                hardware.camera,
                self.send,
                speaker=speaker,
                microphone=microphone,
            )
        self._started_at = self._monotonic()
        # The resend loop sleeps until the next entry is due; these wake it earlier: a new
        # entry (its due time may be the nearest), or a (re)connect (everything goes now).
        self._wake_resend = asyncio.Event()
        self._resend_all = False
        self._resend_wake_ms: int | None = None  # when the resend loop wakes by itself
        self._background: set[asyncio.Task[None]] = set()
        self._secondary: SecondaryPath | None = None  # the SMS path, as last probed
        self.ready = asyncio.Event()  # set once connected to the broker
        self.connects = 0  # connections made so far: a link change proves itself on a new one
        self.configs_refused = 0  # set_config commands refused (no metrics endpoint here)
        self._config_changed = asyncio.Event()  # a trial began or ended: its timer looks again
        # the `config_applied` report that proves the trial once `received`, and its trial
        self._config_proof: tuple[str, Trial] | None = None
        # who else hears of each kept message and verified ack (the control socket)
        self.on_sent: list[Callable[[str, Alert | Cancel | Health], None]] = []
        self.on_ack: list[Callable[[Ack], None]] = []
        self.renewal = Renewal(config, signer, now_ms=self.now_ms)
        self.renewal_held_by: str | None = None  # why a due renewal waits (an incident)
        # renewed, not yet connected with (held): the new one, and the running one's expiry
        self._renewed: tuple[Renewed, int | None] | None = None
        # one renewal at a time: the agent's own look and one asked for (the control socket)
        # must not both ask the gateway, which would issue two certificates for one renewal
        self._renewing = asyncio.Lock()
        self.test_presses = TestPresses(
            self.device_id,
            BELL_OF[config.device.kind],
            config.test_press,
            now_ms=self.now_ms,
            send=lambda alert, message_id: self._keep_and_send(alert, message_id),
            busy=lambda: self.behaviour.incident is not None,
        )
        # agent updates: only on a device installed for them (device/update.py)
        self.updates = UpdateService(self, updater) if updater is not None else None
        self.firmware = agent_version(updater)  # what heartbeats report: the code that runs

    def now_ms(self) -> int:
        """The agent's clock: the system's, corrected by the gateway's last sync."""
        return self._system_clock_ms() + self.clock_offset_ms

    def _tell(
        self, event: Callable[EventArgs, None], *args: EventArgs.args, **kwargs: EventArgs.kwargs
    ) -> None:
        """Tell the observer; a failing observer must not cost the bell anything."""
        try:
            event(*args, **kwargs)
        except Exception:
            log.exception("device %s: observer failed at %s", self.device_id, event.__name__)

    def send(
        self,
        body: Body,
        *,
        message_id: str | None = None,
        retain: bool = False,
        resend: bool = False,
    ) -> asyncio.Future[None]:
        """Everything the agent publishes goes here: the link signs and sends it."""
        published = self.link.send(body, message_id=message_id, retain=retain, resend=resend)
        self._tell(self._observer.sent, body, message_id, published)
        return published

    # ---- inputs and the behaviour's effects ---------------------------------------------

    def on_input(self, event: InputEvent) -> None:
        try:
            effects = self.behaviour.on_input(event, self._monotonic())
        except BehaviourError:
            # a bug in the rules must not stop the next press from working
            log.exception("device %s: input %s %s refused", self.device_id, event.input, event.kind)
            return
        self._apply(effects)

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            try:
                if isinstance(effect, Send):
                    self._keep_and_send(effect.body, effect.message_id, sms=effect.sms)
                elif isinstance(effect, Show):
                    self._show(effect.pattern)
            except Exception:
                # one effect that fails (a bug, hardware) must not cost the ones after it,
                # nor the next press: this runs in a hardware callback
                log.exception("device %s: effect %s failed", self.device_id, effect)

    def _keep_and_send(
        self, body: Alert | Cancel | Health, message_id: str, *, sms: bool = False
    ) -> None:
        """Commit to the outbox first, then publish: a crash in between loses nothing.
        The fsync that makes it survive a power cut overlaps the publish's round trip.
        Storage that refuses it holds it in memory: it goes out, and again until acked."""
        type_name = KEPT_TYPE_NAMES[type(body)]
        now = self._clock_ms()
        resend_at_ms = now + self.resend_delay_ms(0)
        self.outbox.put(
            message_id, type_name, body.model_dump_json(), now, sms=sms, resend_at_ms=resend_at_ms
        )
        self.send(body, message_id=message_id)
        self.outbox.sync_soon()
        if self._resend_wake_ms is None or resend_at_ms < self._resend_wake_ms:
            # the resend loop sleeps until an earlier time: it need not look again now
            self._wake_resend.set()
        log.info("device %s: %s %s sent", self.device_id, type_name, message_id)
        for listener in self.on_sent:
            listener(message_id, body)
        if self.video is not None and isinstance(body, Alert):
            self.video.on_alert(body)

    def report(self, health: Health, message_id: str | None = None) -> None:
        """Tell the gateway (and through it the centres) about this bell itself."""
        log.warning("device %s: reporting %s", self.device_id, health.event)
        self._keep_and_send(health, message_id or new_message_id())

    def _on_storage(self, problem: str | None) -> None:
        health = (
            Health(event="storage_restored")
            if problem is None
            else Health(event="storage_failed", detail=problem)
        )
        try:
            # after the write that found it (a press, perhaps): that message goes first
            asyncio.get_running_loop().call_soon(self.report, health)
        except RuntimeError:  # no loop running (a test driving the agent by hand)
            self.report(health)

    async def outbox_synced(self, timeout_s: float = 30.0) -> None:
        """Wait until every outbox commit so far would survive a power cut."""
        if not await asyncio.to_thread(self.outbox.wait_synced, timeout_s):
            raise TimeoutError(f"outbox not synced within {timeout_s} s")

    def _show(self, pattern: Pattern) -> None:
        d = self.config.device
        self.hardware.indicator.show(
            pattern, silent=self.behaviour.silent, discreet_led=d.discreet_led
        )
        self._tell(self._observer.shown, pattern)

    # ---- resending ----------------------------------------------------------------------

    def resend_delay_ms(self, attempts: int) -> int:
        """Full jitter between the minimum and a ceiling that doubles with every attempt."""
        o = self.config.outbox
        ceiling = min(o.resend_max_s, o.resend_min_s * 2 ** min(attempts, 20))
        return int(self._rng.uniform(o.resend_min_s, max(ceiling, o.resend_min_s)) * 1000)

    def _resend(self, entry: Entry) -> None:
        """Sign again (new sequence number, the corrected time) and publish."""
        body = OUTBOX_BODIES[entry.type].model_validate_json(entry.body_json)
        log.log(
            DECISION,
            "device %s: %s %s not received yet: sent again (attempt %d)",
            self.device_id,
            entry.type,
            entry.id,
            entry.attempts + 1,
        )
        self.send(body, message_id=entry.id, resend=True)
        self.outbox.attempted(entry.id, self._clock_ms() + self.resend_delay_ms(entry.attempts))

    async def _resend_loop(self) -> None:
        while True:
            # after a (re)connect everything pending goes at once; otherwise what is due
            self._wake_resend.clear()
            resend_all, self._resend_all = self._resend_all, False
            connected = self.link.connected
            if connected:
                entries = self.outbox.pending() if resend_all else self.outbox.due(self._clock_ms())
                for entry in entries:
                    self._resend(entry)
            # No polling: thousands of idle simulated agents each querying SQLite twice a
            # second cost half their CPU. While the link is down, only a reconnect helps.
            next_ms = self.outbox.next_attempt_ms() if connected else None
            self._resend_wake_ms = next_ms
            timeout_s = None if next_ms is None else max(0.05, (next_ms - self._clock_ms()) / 1000)
            # asyncio.timeout, not wait_for (which can swallow a cancellation in 3.11)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._wake_resend.wait()

    # ---- link ---------------------------------------------------------------------------

    def _link_up(self) -> None:
        self.ready.set()
        self.connects += 1
        if self.remote.trial is not None:
            self._prove_config()  # a trial of new link settings proves itself on this link
            self._spawn(self.send_heartbeat(), "config hash")  # the gateway's drift view
        self._resend_all = True
        self._wake_resend.set()
        self._tell(self._observer.link_up)
        self._apply(self.behaviour.on_link(True))

    def _on_sms(self, alert_id: str, progress: SmsProgress) -> None:
        self._tell(self._observer.sms_progress, alert_id, progress)
        self._apply(self.behaviour.on_sms(alert_id, progress))

    def _link_down(self) -> None:
        log.warning("device %s: link to the broker lost", self.device_id)
        self._tell(self._observer.link_down)
        self._apply(self.behaviour.on_link(False))

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            uptime_s=max(0, int(self._monotonic() - self._started_at)),
            power="mains" if self.hardware.inputs.power_on_mains() else "battery",
            link_quality=None if self._secondary is None else self._secondary.signal,
            firmware=self.firmware,
            outbox_depth=self.outbox.depth(),
            secondary=self._secondary,
            config_hash=self.remote.hash,
        )

    async def send_heartbeat(self) -> None:
        self._secondary = await self.sms.health()
        if self.link.connected:
            self.send(self.heartbeat())

    # ---- remote configuration (device/remote_config.py) ---------------------------------

    def set_config(self, patch: dict[str, dict[str, Any]]) -> None:
        """Try the gateway's config: check, keep, apply; proven by the gateway's `received`
        for the `config_applied` report sent under it (a PUBACK proves only the broker)."""
        if self.remote.trial is None and config_hash(patch) == self.remote.hash:
            # the gateway sends again what it sees drift on: this one runs already
            log.info("device %s: config %s runs already", self.device_id, self.remote.hash[:12])
            return
        if self.behaviour.incident is not None:
            # not while someone waits for help: a new broker cuts the link the incident's
            # messages need, and a broken one mutes the bell for the trial. Not kept: the
            # gateway sends a drifting bell its config again ([fleet] config_resend_after_s)
            log.warning("device %s: set_config put off: an incident is open", self.device_id)
            return
        try:
            config = self.remote.begin(patch, now_ms=self.now_ms(), connects=self.connects)
        except ConfigFailedBefore as exc:
            log.info("device %s: set_config ignored: %s", self.device_id, exc)  # said once
            return
        except (ConfigRefused, ValueError) as exc:
            self.configs_refused += 1
            log.warning("device %s: set_config refused: %s", self.device_id, exc)
            self.report(Health(event="config_refused", detail=str(exc)[:200]))
            return
        trial = self.remote.trial
        assert trial is not None  # begin() made it
        log.warning(
            "device %s: config %s on trial for %g s",
            self.device_id,
            self.remote.hash[:12],
            config.remote_config.confirm_within_s,
        )
        self._reconfigure(config, link=trial.link_changed)
        self._config_changed.set()
        self._prove_config()  # a new link's proof waits for its first connection (_link_up)
        if not trial.link_changed:
            self._spawn(self.send_heartbeat(), "config hash")

    def _prove_config(self) -> None:
        """Report the trial's config as applied, once per trial, when a report sent now would
        prove it: kept in the outbox and resent like any report until the gateway's
        `received`, which confirms the trial (`_config_proof_acked`)."""
        trial = self.remote.trial
        if trial is None or not self.remote.proven(connects=self.connects):
            return
        if self._config_proof is not None and self._config_proof[1] is trial:
            return  # reported already: the outbox resends it on every new connection
        report_id = new_message_id()
        self._config_proof = (report_id, trial)
        self.report(Health(event="config_applied", detail=self.remote.hash), report_id)

    def _config_proof_acked(self, ack: Ack) -> None:
        proof = self._config_proof
        if ack.stage != "received" or proof is None or ack.ref != proof[0]:
            return
        self._config_proof = None
        if self.remote.trial is proof[1]:  # not a trial since replaced or rolled back
            self.remote.commit()
            self._config_changed.set()
            log.warning("device %s: config %s confirmed", self.device_id, self.remote.hash[:12])

    def check_config_trial(self) -> float | None:
        """Undo a trial not proven in time; the seconds until it is due, or None if none."""
        trial = self.remote.trial
        if trial is None:
            return None
        confirm_s = self.config.remote_config.confirm_within_s
        now = self.now_ms()
        if not self.remote.overdue(now, confirm_s):
            return (trial.started_ms + confirm_s * 1000 - now) / 1000
        # back from the trial's link settings to the good ones' (a trial that kept an
        # earlier trial's broker changed nothing itself, but its rollback does)
        link_changed = touches_link(trial.patch, self.remote.good)
        failed_hash = self.remote.hash
        config = self.remote.rollback()
        self._config_proof = None
        log.warning(
            "device %s: config not confirmed by the gateway within %g s: back to %s",
            self.device_id,
            confirm_s,
            self.remote.hash[:12],
        )
        self._reconfigure(config, link=link_changed)
        self._report_config_failed(failed_hash, "not_confirmed")
        return None

    def _report_config_failed(self, failed_hash: str, reason: str) -> None:
        """`config_failed`: `<hash> <reason>: back to <hash>; ...` (the gateway's drift
        resend tries it again, until it has failed `MAX_FAILURES` times in a row)."""
        then = "not tried again" if self.remote.blocked(failed_hash) else "tried again if sent"
        detail = f"{failed_hash} {reason}: back to {self.remote.hash}; {then}"
        self.report(Health(event="config_failed", detail=detail))

    def _reconfigure(self, config: DeviceConfig, *, link: bool) -> None:
        """Run `config` from now on; `link`: its broker or timings changed, connect again."""
        self.config = config
        self.behaviour.rules = config.behaviour
        self.behaviour.set_silent(config.device.is_silent)
        self.sms.reconfigure(config)
        self.test_presses.reschedule(config.test_press)
        if link:
            self.link.retarget(config)

    def _reconnect_would_cut(self) -> str | None:
        """What connecting again now would cut: the messages of an incident."""
        if self.behaviour.incident is not None:
            return "an incident is open"
        waiting = sum(e.type in ("alert", "cancel") for e in self.outbox.pending())
        return f"{waiting} alerts wait for the gateway's receipt" if waiting else None

    def _renewal_held(self, not_after_ms: int | None = None) -> bool:
        held_by = self.renewal.held_by(self._reconnect_would_cut(), not_after_ms)
        if held_by is not None and held_by != self.renewal_held_by:
            log.info("device %s: certificate renewal waits: %s", self.device_id, held_by)
        self.renewal_held_by = held_by
        return held_by is not None

    async def renew_certificate(self) -> Renewed | None:
        """Renew the certificate if it is due; then connect again with the new one. Not while
        that would cut an incident's link (`renewal_held_by` says why; None is returned)."""
        async with self._renewing:
            return await self._renew_certificate()

    async def _renew_certificate(self) -> Renewed | None:
        if self._renewed is None:
            if not self.renewal.due() or self._renewal_held():
                return None
            running_until_ms = self.renewal.not_after_ms()
            try:
                renewed = await asyncio.to_thread(self.renewal.renew)
            except (RenewalFailed, OSError) as exc:
                # the old certificate still works until it expires: tried again at the next look
                log.warning("device %s: certificate renewal failed: %s", self.device_id, exc)
                return None
            self._renewed = (renewed, running_until_ms)
        renewed, running_until_ms = self._renewed
        # a press during the request: the link keeps the old certificate until it is quiet
        if self._renewal_held(running_until_ms):
            return None
        self._renewed = None
        self.link.session.reload_tls()
        return renewed

    async def _renew_loop(self) -> None:
        while True:
            await self.renew_certificate()
            held = self.renewal_held_by is not None
            await asyncio.sleep(BUSY_LOOK_S if held else self.config.renew.check_every_s)

    async def _config_trial_loop(self) -> None:
        while True:
            self._config_changed.clear()
            due_s = self.check_config_trial()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if due_s is None else max(due_s, 0.05)):
                    await self._config_changed.wait()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.mqtt.heartbeat_s)
            await self.send_heartbeat()

    # ---- receiving ----------------------------------------------------------------------

    def _on_down(self, message: Message) -> None:
        """A message the link has verified: the gateway's signature, this device, fresh."""
        if isinstance(message, AckMessage):
            ack = message.body
            self._tell(self._observer.acked, ack.ref, ack.stage)
            self.sms.on_ack(ack)  # before the outbox forgets it: it may still need an SMS
            self._config_proof_acked(ack)
            if ack.stage != "received" or self.outbox.received(ack.ref):
                # the alert's life for people: one line per stage (a repeated received ack,
                # for a message already forgotten, is not news)
                log.info("device %s: %s %s", self.device_id, ack.ref, STAGE_TEXT[ack.stage])
            self._apply(self.behaviour.on_ack(ack))
            self.test_presses.on_ack(ack)
            for listener in self.on_ack:
                listener(ack)
        elif isinstance(message, CommandMessage):
            self.on_command(message.body)
        elif isinstance(message, SyncMessage):
            self.on_sync(message)
        elif isinstance(message, RtcMessage) and self.video is not None:
            self.video.on_rtc(message.body)

    def on_sync(self, message: SyncMessage) -> None:
        """The gateway's time and the counter it expects (the rule: protocol.replay)."""
        sync = message.body
        off_by_ms = self.now_ms() - message.ts  # ours minus the gateway's, transit included
        if abs(off_by_ms) > CLOCK_TOLERANCE_MS:
            self.clock_offset_ms -= off_by_ms
            # an alert pressed before keeps its age: the SMS fallback counts from the press
            self.outbox.shift_times(-off_by_ms)
            log.warning(
                "device %s: clock %+.1f s off the gateway's: corrected by an offset",
                self.device_id,
                off_by_ms / 1000,
            )
            # a sync for a lost counter may also find the clock far off: that is news too
            if sync.reason == "clock" or abs(off_by_ms) > self.link.window_ms:
                self.report(Health(event="clock_corrected", skew_ms=off_by_ms))
        self.outbox.raise_seq(sync.next_seq)
        # everything waiting goes again now, signed with the corrected time and numbers
        self._resend_all = True
        self._wake_resend.set()

    def on_command(self, command: Command) -> None:
        name = command.name
        if name == "ping":
            self._spawn(self.send_heartbeat(), "ping")
        elif name == "set_silent":
            silent = command.args.get("silent")
            if not isinstance(silent, bool):
                log.warning("device %s: set_silent needs a boolean `silent`", self.device_id)
                return
            # until restart: device.toml holds the lasting setting
            self.behaviour.set_silent(silent)
            log.warning("device %s: silent mode %s by command", self.device_id, silent)
        elif name == "test_press":
            self.test_presses.press("command")
        elif name == "set_config":
            self.set_config(command.config or {})
        elif name == "selftest":
            self._spawn(self._selftest_command(), "selftest")
        elif name == "update" and self.updates is not None:
            self.updates.offer(command.args.get("version"), command.args.get("url"))
        elif name == "update":
            # said, not ignored: the rollout would offer it again for ever
            self.report(refused_update(command.args.get("version"), "not_set_up"))
        elif name in ("video_start", "video_stop") and self.video is not None:
            self.video.on_command(command)
        else:
            log.warning("device %s: command %s is not supported yet; ignored", self.device_id, name)

    async def selftest(self) -> bool:
        """The remote self-test: show it (unless an incident is showing), probe, report.
        True when every probe passed (an update's health check needs it)."""
        if self.behaviour.incident is None:
            self._show(Pattern.SELFTEST)
        passed = True
        modem = self.hardware.modem
        if modem is not None:
            try:
                info = await modem.probe()
                passed = info.ok
                log.warning("device %s: selftest: modem ok=%s", self.device_id, info.ok)
            except HalError as exc:
                passed = False
                log.warning("device %s: selftest: modem failed: %s", self.device_id, exc)
        await self.send_heartbeat()
        return passed

    async def _selftest_command(self) -> None:
        await self.selftest()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"{self.device_id} {name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- running ------------------------------------------------------------------------

    def report_outbox_recovery(self) -> None:
        """A damaged outbox found at start-up: what was lost cannot be known, that it
        happened and how much was saved can."""
        recovery = self.outbox.recovery
        if recovery is not None:
            self.report(
                Health(
                    event="outbox_recovered",
                    salvaged=recovery.salvaged,
                    detail=f"{recovery.problem}; moved to {recovery.moved_to.name}"[:200],
                )
            )

    def report_abandoned_config(self) -> None:
        """A trial the agent stopped during: it starts on the last good config instead."""
        abandoned = self.remote.abandoned
        if abandoned is not None:
            log.warning("device %s: restarted during a config trial: undone", self.device_id)
            self._report_config_failed(config_hash(abandoned), "restarted")
            self.remote.abandoned = None

    async def run(self) -> None:
        self.report_outbox_recovery()
        self.report_abandoned_config()
        self.hardware.inputs.start(self.on_input)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="link")
                tasks.create_task(self._resend_loop(), name="resend")
                tasks.create_task(self._heartbeat_loop(), name="heartbeat")
                tasks.create_task(self.sms.run(), name="sms")
                tasks.create_task(self.test_presses.run(), name="test press")
                tasks.create_task(self._config_trial_loop(), name="config trial")
                if self.renewal.enabled:
                    tasks.create_task(self._renew_loop(), name="certificate renewal")
                if self.updates is not None:
                    tasks.create_task(self.updates.run(), name="updates")
                if self.video is not None:
                    tasks.create_task(self.video.run(), name="video")
                tasks.create_task(sdnotify.watchdog_pings(), name="watchdog")
                # Ready as soon as presses are taken and kept: a device whose network is down
                # at boot must still run (outbox, SMS), not be restarted for a late start.
                sdnotify.notify("READY=1")
        finally:
            for task in self._background:
                task.cancel()
            await self.link.close()
            await self.hardware.aclose()
            self.outbox.close()
