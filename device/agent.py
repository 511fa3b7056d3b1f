"""The device agent: buttons in, signed alerts out, acks shown on the indicator.

The agent is a stack of parts: hardware (ports), the durable outbox, the MQTT link, and
the behaviour that decides what a press means. It runs as one TaskGroup of named tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi import sdnotify
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.ports import InputEvent, Pattern
from device.link import Link
from device.outbox import Entry, Outbox
from protocol.ids import new_message_id
from protocol.jws import Signer
from protocol.messages import AckMessage, Alert, Body, Cancel, Heartbeat, Message

log = logging.getLogger(__name__)

# Outbox bodies are stored as JSON; this is how they come back as models.
OUTBOX_BODIES: dict[str, type[Alert] | type[Cancel]] = {"alert": Alert, "cancel": Cancel}


class Agent:
    def __init__(
        self,
        config: DeviceConfig,
        *,
        signer: Signer,
        gateway_key: Ed25519PublicKey,
        hardware: Hardware,
        outbox: Outbox | None = None,
        clock_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device.id
        self.hardware = hardware
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._rng = rng or random.Random()
        self.outbox = outbox or Outbox(config.device.state_dir / "outbox.db")
        self.link = Link(
            config,
            signer,
            gateway_key,
            self.outbox,
            self._on_down,
            on_connect=self._resend_all,
            clock_ms=self._clock_ms,
        )
        self._started_at = time.monotonic()
        self._wake_resend = asyncio.Event()
        self.ready = asyncio.Event()

    # ---- inputs -------------------------------------------------------------------------

    def on_input(self, event: InputEvent) -> None:
        if event.input == "emergency" and event.kind == "pressed":
            bell = "store" if self.config.device.kind == "store" else "emergency"
            self.raise_alert(Alert(bell=bell, trigger="press", silent=self.config.device.is_silent))

    def raise_alert(self, body: Alert | Cancel) -> str:
        """Keep the message durably, then send it; returns its id."""
        message_id = new_message_id()
        type_name = "alert" if isinstance(body, Alert) else "cancel"
        self.outbox.put(message_id, type_name, body.model_dump_json(), self._clock_ms())
        self._show(Pattern.SENDING)
        self._transmit(message_id, body)
        return message_id

    # ---- sending ------------------------------------------------------------------------

    def _transmit(self, message_id: str, body: Body) -> None:
        self.link.send(body, message_id=message_id)
        delay = self.config.outbox.resend_min_s
        self.outbox.attempted(message_id, self._clock_ms() + int(delay * 1000))

    def _resend_all(self) -> None:
        self._wake_resend.set()

    def resend_delay_ms(self, attempts: int) -> int:
        o = self.config.outbox
        ceiling = min(o.resend_max_s, o.resend_min_s * 2 ** min(attempts, 20))
        return int(self._rng.uniform(o.resend_min_s, ceiling) * 1000)

    def _resend(self, entry: Entry) -> None:
        body = OUTBOX_BODIES[entry.type].model_validate_json(entry.body_json)
        self.link.send(body, message_id=entry.id)
        self.outbox.attempted(entry.id, self._clock_ms() + self.resend_delay_ms(entry.attempts))

    async def _resend_loop(self) -> None:
        while True:
            woken = self._wake_resend.is_set()
            self._wake_resend.clear()
            if self.link.connected:
                now = self._clock_ms()
                entries = self.outbox.pending() if woken else self.outbox.due(now)
                for entry in entries:
                    self._resend(entry)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_resend.wait(), 0.5)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.mqtt.heartbeat_s)
            if self.link.connected:
                self.link.send(
                    Heartbeat(
                        uptime_s=int(time.monotonic() - self._started_at),
                        power="mains" if self.hardware.inputs.power_on_mains() else "battery",
                        firmware=self.config.device.firmware,
                        outbox_depth=self.outbox.depth(),
                    )
                )

    # ---- receiving ----------------------------------------------------------------------

    def _on_down(self, message: Message) -> None:
        if isinstance(message, AckMessage):
            ack = message.body
            if ack.stage == "received":
                self.outbox.received(ack.ref)
            self._show(Pattern.OFF if ack.stage == "closed" else Pattern(ack.stage))

    def _show(self, pattern: Pattern) -> None:
        d = self.config.device
        self.hardware.indicator.show(pattern, silent=d.is_silent, discreet_led=d.discreet_led)

    # ---- running ------------------------------------------------------------------------

    async def run(self) -> None:
        self.hardware.inputs.start(self.on_input)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run(), name="link")
                tasks.create_task(self._resend_loop(), name="resend")
                tasks.create_task(self._heartbeat_loop(), name="heartbeat")
                tasks.create_task(sdnotify.watchdog_pings(), name="watchdog")
                await self.link.session.wait_connected()
                self.ready.set()
                sdnotify.notify("READY=1")
        finally:
            await self.link.close()
            await self.hardware.aclose()
            self.outbox.close()
