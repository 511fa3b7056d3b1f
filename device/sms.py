"""SMS fallback: an alert the centre has not got in time goes out by SMS, counted from the press.

The outbox marks which messages may need it (alerts that open an incident, and duress).
Two rules, both timed from the press (the message's `created_ms`), never from a link change:
a black-holed link looks up for tens of seconds, and a person in danger cannot wait for TCP.

- not `received` by the gateway within `[sms] after_s` (15 s): by SMS, link up or not;
- `received` but not `delivered` to a centre within `[sms] undelivered_after_s` (30 s): by
  SMS too, even while MQTT is up (the gateway may have no way to a centre).

Each configured number gets one SMS per alert, whichever rule comes first, with the device
id, the alert id (so whoever gets both the SMS and the MQTT alert can tell they are one
press), its kind and its time: never an address. The alert stays in the outbox and still
goes through MQTT, so the centre sees it either way.

Being "received" removes the alert from the outbox, so the few alerts that wait for
`delivered` are kept beside it, in a small file of their own (`UNDELIVERED_FILE` in the
state dir): an agent restarted in those 30 s (a crash, the watchdog, a power cut) still
sends the SMS the person needs. Written whole and renamed into place; fsynced when an
alert is added (what must survive), not when one leaves (at worst, one SMS too many).

Phone numbers are personal data: logs say "number 2 of 3", never the number itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ansimi.files import write_atomic
from device.behaviour import SmsProgress
from device.config import DeviceConfig
from device.hal.ports import HalError, Modem, SmsMode
from device.outbox import Entry, Outbox
from protocol.clock import Clock
from protocol.messages import Ack, Alert, SecondaryPath

log = logging.getLogger(__name__)

# A number whose SMS failed is tried again on later checks, up to this many times in all.
MAX_TRIES: Final = 3
CHECK_EVERY_S: Final = 1.0
# The modem may be busy with an SMS; a health probe does not wait for it longer than this.
PROBE_TIMEOUT_S: Final = 2.0
SET_NUMBERS_FIX: Final = "set them with `ansimi device set-sms-numbers`"
# In the state dir, beside the outbox: alerts received but not yet delivered (see above).
UNDELIVERED_FILE: Final = "sms-undelivered.json"
# sms_due's cut-off meaning "whenever it was pressed" (a clock set back must not hide one)
ANY_TIME_MS: Final = 2**63 - 1

_KIND: Final = {"emergency": "EMERGENCY", "doorbell": "DOORBELL EMERGENCY", "store": "ROBBERY"}
_KIND_KO: Final = {
    "emergency": "비상벨 긴급 호출",
    "doorbell": "초인종 비상 호출",
    "store": "매장 강도 신고",
}
# Korea keeps one offset all year (no summer time)
KST: Final = dt.timezone(dt.timedelta(hours=9), "KST")


def sms_text(device_id: str, entry: Entry, mode: SmsMode = "text") -> str:
    """Who, what, which alert, when. `text` mode: one GSM 7-bit SMS in English, well under
    160 characters. `pdu` mode: in Korean, with the alert id in the first part (67 UCS-2
    characters) so a phone that shows parts apart still shows which alert it is."""
    alert = Alert.model_validate_json(entry.body_json)
    urgent = alert.urgent or alert.trigger == "long_press"
    if mode == "pdu":
        what = "강요에 의한 취소(위험)" if alert.trigger == "duress" else _KIND_KO[alert.bell]
        at = dt.datetime.fromtimestamp(entry.created_ms / 1000, KST)
        return (
            f"[안심] 알림 {entry.id}: {what}{' 긴급' if urgent else ''}, "
            f"기기 {device_id}, {at:%Y-%m-%d %H:%M:%S} KST"
        )
    what = "DURESS" if alert.trigger == "duress" else _KIND[alert.bell]
    at_utc = dt.datetime.fromtimestamp(entry.created_ms / 1000, dt.UTC)
    return (
        f"Ansimi {what}{' urgent' if urgent else ''}: device {device_id}, alert {entry.id}, "
        f"{at_utc:%Y-%m-%d %H:%M:%S} UTC"
    )


def csq_percent(rssi: int | None) -> int | None:
    """AT+CSQ rssi (0..31, about -113..-51 dBm) as the heartbeat's 0..100 link quality."""
    return None if rssi is None else round(rssi * 100 / 31)


class SmsFallback:
    def __init__(
        self,
        config: DeviceConfig,
        modem: Modem | None,
        outbox: Outbox,
        *,
        clock_ms: Clock,
        on_progress: Callable[[str, SmsProgress], None] | None = None,
        undelivered_path: Path | None = None,
    ) -> None:
        """`undelivered_path`: where the alerts waiting for `delivered` survive a restart
        (None: memory only, for tests that do not restart)."""
        # False: that file survives a crash of the agent, not a power cut (no fsync): the
        # simulator's thousands of agents on one disk, like its outboxes (power_safe=False)
        self.power_safe = True
        self._device_id = config.device.id
        self.reconfigure(config)
        self._modem = modem
        self._outbox = outbox
        self._clock_ms = clock_ms
        # told when an alert's SMS starts ("trying") and when one number has it ("sent")
        self._on_progress = on_progress
        # received by the gateway, not yet delivered to a centre: alert id -> its entry
        self._undelivered_path = undelivered_path
        self._undelivered: dict[str, Entry] = self._load_undelivered()
        # per alert: the numbers (by index) that have their SMS, and tries per number
        self._done: dict[str, set[int]] = {}
        self._tries: dict[tuple[str, int], int] = {}
        self._last_health: SecondaryPath | None = None
        self.sent = 0
        self.failed = 0

    def reconfigure(self, config: DeviceConfig) -> None:
        """Take `config`'s timings, mode and numbers (a remote config may bring numbers the
        gateway sealed for this device). A config is not tried during an incident; only its
        rollback may come during one, and an alert's SMS then goes on by position in the new
        list."""
        self._numbers = list(config.sms.numbers)
        self._after_ms = int(config.sms.after_s * 1000)
        self._undelivered_after_ms = int(config.sms.undelivered_after_s * 1000)
        self._mode = config.sms.mode

    @property
    def enabled(self) -> bool:
        return self._modem is not None and bool(self._numbers)

    def warn_if_disabled(self) -> None:
        """Say at start-up, with the fix, why an alert would have no second path."""
        if not self._numbers:
            log.warning(
                "device %s: no SMS numbers configured: an alert the centre cannot get by "
                "MQTT has no fallback; %s",
                self._device_id,
                SET_NUMBERS_FIX,
            )
        elif self._modem is None:
            log.warning(
                "device %s: SMS numbers are configured but no modem: set "
                "[hardware] modem_port in device.toml",
                self._device_id,
            )

    # ---- acks -----------------------------------------------------------------------------

    def on_ack(self, ack: Ack) -> None:
        """Call before the outbox forgets a `received` message: it may still need an SMS."""
        if ack.stage == "received":
            if not self.enabled or ack.ref in self._undelivered:
                return
            # still marked "SMS wanted, not done" in the outbox: wait for `delivered`
            for entry in self._outbox.sms_due(ANY_TIME_MS):
                if entry.id == ack.ref:
                    self._undelivered[entry.id] = entry
                    self._save_undelivered(durable=True)
                    return
            return
        # delivered, or further still (acks may skip stages): a centre has it
        if self._undelivered.pop(ack.ref, None) is not None:
            self._save_undelivered(durable=False)
            self._forget(ack.ref)

    def _load_undelivered(self) -> dict[str, Entry]:
        path = self._undelivered_path
        if path is None or not path.exists():
            return {}
        try:
            rows = json.loads(path.read_text())
            entries = [Entry(i, t, body, int(created), 0, 0) for i, t, body, created in rows]
        except (OSError, ValueError, TypeError) as exc:
            # a torn or foreign file must not stop the agent: MQTT still carries the alerts
            log.error("SMS fallback: cannot read %s, its alerts get no SMS: %s", path, exc)
            return {}
        return {entry.id: entry for entry in entries}

    def _save_undelivered(self, *, durable: bool) -> None:
        path = self._undelivered_path
        if path is None:
            return
        durable = durable and self.power_safe
        rows = [[e.id, e.type, e.body_json, e.created_ms] for e in self._undelivered.values()]
        try:
            if not rows:
                path.unlink(missing_ok=True)
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            # the alerts' bodies: readable by the service only
            write_atomic(path, json.dumps(rows).encode(), mode=0o600, durable=durable)
        except OSError as exc:
            # memory still holds them: only a restart in the next seconds would forget them
            log.error("SMS fallback: cannot keep undelivered alerts in %s: %s", path, exc)

    # ---- sending --------------------------------------------------------------------------

    def due(self) -> list[Entry]:
        """What should go by SMS now: oldest press first, each alert once."""
        now = self._clock_ms()
        due = {e.id: e for e in self._outbox.sms_due(now - self._after_ms)}
        cutoff = now - self._undelivered_after_ms
        for entry in self._undelivered.values():
            if entry.created_ms <= cutoff:
                due.setdefault(entry.id, entry)
        return sorted(due.values(), key=lambda e: e.created_ms)

    async def check(self) -> None:
        """Send what is due now, whatever the MQTT link seems to be."""
        if self._modem is None or not self._numbers:
            return
        for entry in self.due():
            await self._send(self._modem, entry)

    async def _send(self, modem: Modem, entry: Entry) -> None:
        text = sms_text(self._device_id, entry, self._mode)
        first_go = entry.id not in self._done
        done = self._done.setdefault(entry.id, set())
        if first_go:
            self._progress(entry.id, "trying")
        total = len(self._numbers)
        for index, number in enumerate(self._numbers):
            if index in done or self._tries.get((entry.id, index), 0) >= MAX_TRIES:
                continue
            self._tries[entry.id, index] = self._tries.get((entry.id, index), 0) + 1
            try:
                ref = await modem.send_sms(number, text, mode=self._mode)
            except HalError as exc:
                # the modem's errors never include the number (see device/hal/modem.py)
                self.failed += 1
                log.warning(
                    "SMS fallback for alert %s: number %d of %d failed: %s",
                    entry.id,
                    index + 1,
                    total,
                    exc,
                )
                continue
            self.sent += 1
            if not done:
                self._progress(entry.id, "sent")
            done.add(index)
            log.warning(
                "SMS fallback for alert %s: number %d of %d sent (reference %d)",
                entry.id,
                index + 1,
                total,
                ref,
            )
        finished = all(
            i in done or self._tries.get((entry.id, i), 0) >= MAX_TRIES for i in range(total)
        )
        if finished:
            if not done:
                self._progress(entry.id, "failed")
            # never again, even after a restart (if the outbox still holds it)
            self._outbox.sms_done(entry.id)
            if self._undelivered.pop(entry.id, None) is not None:
                self._save_undelivered(durable=False)
            self._forget(entry.id)

    def _forget(self, alert_id: str) -> None:
        self._done.pop(alert_id, None)
        for i in range(len(self._numbers)):
            self._tries.pop((alert_id, i), None)

    def _progress(self, alert_id: str, progress: SmsProgress) -> None:
        if self._on_progress is not None:
            self._on_progress(alert_id, progress)

    async def run(self) -> None:
        self.warn_if_disabled()
        if not self.enabled:
            return
        while True:
            try:
                await self.check()
            except Exception:
                # a modem bug must not take the agent down: the alert still goes by MQTT
                log.exception("SMS fallback check failed")
            await asyncio.sleep(CHECK_EVERY_S)

    # ---- health ---------------------------------------------------------------------------

    async def health(self) -> SecondaryPath | None:
        """The secondary path as the heartbeat reports it (AT+CPIN?, AT+CREG?, AT+CSQ);
        None while nothing is known (the modem busy before its first answer)."""
        numbers = len(self._numbers)
        modem = self._modem
        if modem is None:
            return SecondaryPath(modem=False, numbers=numbers)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                info = await modem.probe()
        except TimeoutError:
            # Busy sending an SMS, most likely (a restarted agent's first minute): busy is
            # not broken. Say what we knew, or nothing: a guess ("SIM unknown") would be a
            # secondary_path_down at the centre while the modem is sending for a victim.
            log.info("device %s: the modem is busy; health as last known", self._device_id)
            return self._last_health
        except HalError as exc:
            log.warning("device %s: the modem does not answer: %s", self._device_id, exc)
            self._last_health = SecondaryPath(modem=False, numbers=numbers)
            return self._last_health
        self._last_health = SecondaryPath(
            modem=True,
            sim=info.sim,
            registered=info.registered,
            signal=csq_percent(info.signal),
            numbers=numbers,
        )
        return self._last_health
