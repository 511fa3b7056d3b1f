"""The bell's own test presses: on its schedule and when the gateway asks.

A test is an alert with `trigger = "test"`, kept in the outbox like any alert so it survives a
restart and is resent until `received`; it shows nothing (a bell that beeps on its own at the
door would alarm the street) and opens no incident. It proves the path when it comes back
`delivered`; the gateway notices the ones that do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final, Literal

from ansimi.testpress import TestPressSchedule, next_test_at_ms
from protocol.clock import Clock
from protocol.ids import new_message_id
from protocol.messages import Ack, Alert

log = logging.getLogger(__name__)

# a test falling due during an incident waits this long and looks again: the person first
BUSY_RETRY_MS: Final = 10 * 60_000
# how long the loop sleeps at most before it reads the clock again (a sync may move it)
RECHECK_MS: Final = 3_600_000

Why = Literal["schedule", "command"]


class TestPresses:
    __test__ = False  # not a pytest class

    def __init__(
        self,
        device_id: str,
        bell: Literal["emergency", "doorbell", "store"],
        schedule: TestPressSchedule,
        *,
        now_ms: Clock,
        send: Callable[[Alert, str], None],
        busy: Callable[[], bool],
        new_id: Callable[[], str] = new_message_id,
    ) -> None:
        self._device_id = device_id
        self._bell = bell
        self._now_ms = now_ms
        self._send = send
        self._busy = busy
        self._new_id = new_id
        self.in_flight: str | None = None
        self.next_at_ms: int | None = None
        self._rescheduled = asyncio.Event()
        self.reschedule(schedule)

    def reschedule(self, schedule: TestPressSchedule) -> None:
        """Follow a new schedule (a remote config): the next test is drawn again."""
        self._schedule = schedule
        self.next_at_ms = (
            next_test_at_ms(self._device_id, self._now_ms(), schedule) if schedule.enabled else None
        )
        self._rescheduled.set()

    def press(self, why: Why) -> str | None:
        """Send a test now; the id sent, or None while an incident is open."""
        if self._busy():
            log.warning("device %s: test press (%s) put off: incident open", self._device_id, why)
            return None
        message_id = self._new_id()
        self.in_flight = message_id
        log.info("device %s: test press (%s) %s", self._device_id, why, message_id)
        self._send(Alert(bell=self._bell, trigger="test"), message_id)
        return message_id

    def tick(self) -> int | None:
        """Press if the scheduled test is due; the milliseconds until the next look."""
        if self.next_at_ms is None:
            return None
        now = self._now_ms()
        if now >= self.next_at_ms:
            if self.press("schedule") is None:
                self.next_at_ms = now + BUSY_RETRY_MS
            else:
                self.next_at_ms = next_test_at_ms(self._device_id, now, self._schedule)
        return min(RECHECK_MS, max(0, self.next_at_ms - now))

    def on_ack(self, ack: Ack) -> None:
        if ack.ref == self.in_flight and ack.stage == "delivered":
            log.info("device %s: test press %s delivered: path proven", self._device_id, ack.ref)
            self.in_flight = None

    async def run(self) -> None:
        while True:
            self._rescheduled.clear()
            wait_ms = self.tick()
            # scheduled tests off: only a new schedule wakes it (a test asked for by command
            # still goes)
            timeout_s = None if wait_ms is None else max(wait_ms, 50) / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._rescheduled.wait()
