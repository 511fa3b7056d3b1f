"""SMS fallback: an alert the gateway has not received in time, while the link is down.

The outbox marks which messages may need it (alerts that open an incident, and duress).
Once such a message has waited `[sms] after_s` without a `received` ack and the MQTT link
is down, each configured number gets one SMS with the device id, the alert id, its kind
and its time: never an address. The alert stays in the outbox and still goes through
MQTT when the link returns, so the centre sees it either way.

Phone numbers are personal data: logs say "number 2 of 3", never the number itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Final

from device.config import DeviceConfig
from device.hal.ports import HalError, Modem
from device.outbox import Entry, Outbox
from protocol.messages import Alert

log = logging.getLogger(__name__)

# A number whose SMS failed is tried again on later checks, up to this many times in all.
MAX_TRIES: Final = 3
CHECK_EVERY_S: Final = 1.0

_KIND: Final = {"emergency": "EMERGENCY", "doorbell": "DOORBELL EMERGENCY", "store": "ROBBERY"}


def sms_text(device_id: str, entry: Entry) -> str:
    """One GSM 7-bit SMS, well under 160 characters: who, what, which alert, when."""
    alert = Alert.model_validate_json(entry.body_json)
    what = "DURESS" if alert.trigger == "duress" else _KIND[alert.bell]
    urgent = " urgent" if alert.urgent or alert.trigger == "long_press" else ""
    at = dt.datetime.fromtimestamp(entry.created_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"Ansimi {what}{urgent}: device {device_id}, alert {entry.id}, {at} UTC"


class SmsFallback:
    def __init__(
        self,
        config: DeviceConfig,
        modem: Modem | None,
        outbox: Outbox,
        *,
        link_up: Callable[[], bool],
        clock_ms: Callable[[], int],
    ) -> None:
        self._device_id = config.device.id
        self._after_ms = int(config.sms.after_s * 1000)
        self._numbers = list(config.sms.numbers)
        self._modem = modem
        self._outbox = outbox
        self._link_up = link_up
        self._clock_ms = clock_ms
        # per alert: the numbers (by index) that have their SMS, and tries per number
        self._done: dict[str, set[int]] = {}
        self._tries: dict[tuple[str, int], int] = {}
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self._modem is not None and bool(self._numbers)

    async def check(self) -> None:
        """Send what is due now; returns at once while the link is up."""
        if self._modem is None or not self._numbers or self._link_up():
            return
        for entry in self._outbox.sms_due(self._clock_ms() - self._after_ms):
            await self._send(self._modem, entry)
            if self._link_up():
                return  # the link is back: MQTT will carry the rest

    async def _send(self, modem: Modem, entry: Entry) -> None:
        text = sms_text(self._device_id, entry)
        done = self._done.setdefault(entry.id, set())
        total = len(self._numbers)
        for index, number in enumerate(self._numbers):
            if index in done or self._tries.get((entry.id, index), 0) >= MAX_TRIES:
                continue
            self._tries[entry.id, index] = self._tries.get((entry.id, index), 0) + 1
            try:
                ref = await modem.send_sms(number, text)
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
            self._outbox.sms_done(entry.id)
            self._done.pop(entry.id, None)
            for i in range(total):
                self._tries.pop((entry.id, i), None)

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            try:
                await self.check()
            except Exception:
                # a modem bug must not take the agent down: the alert still goes by MQTT
                log.exception("SMS fallback check failed")
            await asyncio.sleep(CHECK_EVERY_S)
