"""Fakes behind the same ports, for the simulator and the tests.

No threads: a simulator runs thousands of agents in one process, so every fake lives on the
event loop (timers, not sleeps in threads), and time is the loop's time.

`PtyModem` is different in kind: it is a fake *modem*, not a fake driver. It speaks AT
commands on a pseudo-terminal, so the real `SerialModem` driver can be exercised end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from device.hal.indicator import DARK, Output, resolve
from device.hal.modem import check_number, prepare_sms_text
from device.hal.pdu import read_submit, submit_pdus
from device.hal.ports import (
    ButtonName,
    InputEvent,
    InputSink,
    ModemInfo,
    ModemRejected,
    ModemTimeout,
    Pattern,
    SmsMode,
)

# --- inputs ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Down:
    since: float
    ticks: int = 0
    timer: asyncio.TimerHandle | None = None


class FakeInputs:
    """Inputs driven by a test or a simulated person, on the event loop.

    Levels (`power_on_mains`, `tamper_open`) change at once; events reach the sink only
    after `start`, synchronously, from the calling method (which runs on the loop, as the
    port requires). While a button is down, `held` ticks come from loop timers every
    `hold_repeat_s`, as gpiozero's hold thread would send them.
    """

    def __init__(
        self, hold_repeat_s: float = 1.0, *, on_mains: bool = True, tamper_open: bool = False
    ) -> None:
        self.hold_repeat_s = hold_repeat_s
        self._on_mains = on_mains
        self._tamper_open = tamper_open
        self._sink: InputSink | None = None
        self._down: dict[ButtonName, _Down] = {}

    def start(self, sink: InputSink) -> None:
        self._sink = sink

    def close(self) -> None:
        self._sink = None
        for down in self._down.values():
            if down.timer is not None:
                down.timer.cancel()
        self._down.clear()

    def power_on_mains(self) -> bool:
        return self._on_mains

    def tamper_open(self) -> bool:
        return self._tamper_open

    def is_down(self, name: ButtonName) -> bool:
        return name in self._down

    def press(self, name: ButtonName) -> None:
        if name in self._down:
            return  # no edge, no event: the button is already down
        loop = asyncio.get_running_loop()
        down = _Down(since=loop.time())
        self._down[name] = down
        self._emit(InputEvent(name, "pressed"))
        self._schedule_tick(loop, name, down)

    def release(self, name: ButtonName) -> None:
        down = self._down.pop(name, None)
        if down is None:
            return
        if down.timer is not None:
            down.timer.cancel()
        now = asyncio.get_running_loop().time()
        # A tick due at this very instant may not have run yet (timer order is not defined
        # for equal times); deliver it, so holding n * hold_repeat_s always gives n ticks.
        while down.since + (down.ticks + 1) * self.hold_repeat_s <= now:
            down.ticks += 1
            self._emit(InputEvent(name, "held", down.ticks * self.hold_repeat_s))
        self._emit(InputEvent(name, "released", now - down.since))

    async def hold(self, name: ButtonName, seconds: float) -> None:
        """Press, keep down for `seconds` of loop time (ticking `held`), release."""
        self.press(name)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.release(name)

    def open_tamper(self) -> None:
        if not self._tamper_open:
            self._tamper_open = True
            self._emit(InputEvent("tamper", "opened"))

    def close_tamper(self) -> None:
        if self._tamper_open:
            self._tamper_open = False
            self._emit(InputEvent("tamper", "closed"))

    def lose_power(self) -> None:
        if self._on_mains:
            self._on_mains = False
            self._emit(InputEvent("power", "power_lost"))

    def restore_power(self) -> None:
        if not self._on_mains:
            self._on_mains = True
            self._emit(InputEvent("power", "power_restored"))

    def _schedule_tick(
        self, loop: asyncio.AbstractEventLoop, name: ButtonName, down: _Down
    ) -> None:
        # Ticks at exact multiples of hold_repeat_s from the press: no drift over long holds.
        due = down.since + (down.ticks + 1) * self.hold_repeat_s
        down.timer = loop.call_at(due, self._tick, loop, name, down)

    def _tick(self, loop: asyncio.AbstractEventLoop, name: ButtonName, down: _Down) -> None:
        down.ticks += 1
        self._emit(InputEvent(name, "held", down.ticks * self.hold_repeat_s))
        self._schedule_tick(loop, name, down)

    def _emit(self, event: InputEvent) -> None:
        if self._sink is not None:
            self._sink(event)


# --- indicator ------------------------------------------------------------------------


class FakeIndicator:
    """Records what was shown and tells what a person would see and hear now.

    Uses the same table and silent rule as the gpiozero adapter (`indicator.resolve`), for a
    device with a status LED, a buzzer and (unless told otherwise) a discreet LED. Time is
    not modelled: a pattern that blinks a few times counts as lit while it is current.
    """

    def __init__(self, *, has_discreet_led: bool = True) -> None:
        self.has_discreet_led = has_discreet_led
        self.history: list[tuple[Pattern, bool]] = []
        self.pattern = Pattern.OFF
        self.current: Output = DARK
        self.closed = False

    def show(self, pattern: Pattern, *, silent: bool, discreet_led: bool = False) -> None:
        self.history.append((pattern, silent))
        self.pattern = pattern
        self.current = resolve(
            pattern,
            silent=silent,
            discreet_led=discreet_led,
            has_discreet_led=self.has_discreet_led,
        )

    def close(self) -> None:
        self.current = DARK
        self.closed = True

    @property
    def led_lit(self) -> bool:
        """Any light shows: the status LED or the discreet LED."""
        return self.current.lit

    @property
    def discreet_lit(self) -> bool:
        return self.current.discreet is not None

    @property
    def buzzer_sounding(self) -> bool:
        return self.current.buzzer is not None


# --- modem ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentSms:
    number: str
    text: str
    reference: int
    # the modem's clock (wall time unless given one) when it went out; not part of "which SMS"
    at: float = field(default=0.0, compare=False)
    # in PDU mode, the PDUs (hex) the modem would have been given, one per part
    pdus: tuple[str, ...] = ()


class FakeModem:
    """An in-memory modem: records each SMS, and fails on request.

    Numbers are checked and texts prepared by the same functions as `SerialModem`, so what
    `sent` holds is what a real modem would have sent.
    """

    def __init__(
        self,
        *,
        model: str = "FAKE-MODEM",
        signal: int | None = 20,
        sim_ready: bool = True,
        registered: bool = True,
        port: str = "fake",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.model = model
        self.signal = signal
        self.sim_ready = sim_ready
        self.registered = registered
        # when each SMS was sent (the simulator measures press -> SMS with it)
        self._clock = clock or time.time
        self.port = port
        self.sent: list[SentSms] = []
        self.closed = False
        self._failures: deque[tuple[Literal["rejected", "timeout"], int | None, float]] = deque()
        self._reference = 0

    def fail_next(
        self,
        count: int = 1,
        kind: Literal["rejected", "timeout"] = "rejected",
        *,
        cms_error: int | None = 500,
        after_s: float = 0.0,
    ) -> None:
        """Make the next `count` sends fail, after `after_s` seconds of loop time."""
        self._failures.extend([(kind, cms_error, after_s)] * count)

    async def probe(self) -> ModemInfo:
        return ModemInfo(
            model=self.model,
            ok=self.sim_ready,
            signal=self.signal,
            sim="ready" if self.sim_ready else "absent",
            registered=self.registered,
        )

    async def signal_quality(self) -> int | None:
        return self.signal

    async def send_sms(self, number: str, text: str, *, mode: SmsMode = "text") -> int:
        check_number(number)
        # what the modem would send: the text as it is in PDU mode, 7-bit ASCII otherwise
        prepared = text if mode == "pdu" else prepare_sms_text(text)
        command = 'AT+CMGS="…"'
        if self._failures:
            kind, cms_error, after_s = self._failures.popleft()
            if after_s:
                await asyncio.sleep(after_s)
            if kind == "timeout":
                raise ModemTimeout(self.port, command, after_s)
            reply = "ERROR" if cms_error is None else f"+CMS ERROR: {cms_error}"
            raise ModemRejected(self.port, command, reply, cms_error=cms_error)
        # Real modems count message references modulo 256.
        self._reference = (self._reference + 1) % 256
        pdus = () if mode == "text" else submit_pdus(number, text, self._reference)
        hexes = tuple(pdu.hex for pdu in pdus)
        self.sent.append(SentSms(number, prepared, self._reference, self._clock(), hexes))
        return self._reference

    async def close(self) -> None:
        self.closed = True


@dataclass(slots=True)
class PtyScript:
    """How a `PtyModem` behaves; change fields between commands to script a test."""

    # Echo commands back, as modems do after power-up until ATE0.
    echo: bool = True
    # False: keep echoing after ATE0 (some modems, and some firmware after a reset).
    honour_ate0: bool = True
    # AT+CMGS: "ok"; "error" (ERROR instead of the > prompt); "cms_error" (prompt, then
    # +CMS ERROR: cms_error after the text); "silent" (no prompt); "silent_after_text".
    cmgs: Literal["ok", "error", "cms_error", "silent", "silent_after_text"] = "ok"
    cms_error: int = 500
    # Never answer anything at all (a dead or unpowered modem).
    silent: bool = False
    # Interleave unsolicited +CMTI lines with answers.
    unsolicited: bool = False
    csq: str = "21,0"
    # AT+CREG? answer: "0,1" registered on the home network, "0,2" searching, "0,3" denied
    creg: str = "0,1"
    model: str = "ANSIMI-PTY"
    sim_ready: bool = True
    # Seconds before each answer.
    reply_delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ReceivedSms:
    number: str
    text: str
    # The bytes that followed the > prompt, terminator included.
    raw: bytes
    # PDU mode: the AT+CMGS length given, and the part of a concatenated message
    pdu_length: int | None = None
    part: tuple[int, int, int] | None = None


_CMGS_CMD = re.compile(r'AT\+CMGS="(\+?[0-9]+)"', re.IGNORECASE)
# PDU mode: AT+CMGS=<TPDU length in octets>
_CMGS_PDU = re.compile(r"AT\+CMGS=([0-9]+)", re.IGNORECASE)


class PtyModem:
    """An AT-speaking modem on a pseudo-terminal; `port` is the path to give `SerialModem`.

    Bytes from the driver are read by `loop.add_reader` on the master side and handled by
    one asyncio task, so scripted delays are plain `asyncio.sleep`s on the loop.
    Use as `async with PtyModem(PtyScript(...)) as modem:`.
    """

    def __init__(self, script: PtyScript | None = None) -> None:
        self.script = script or PtyScript()
        self.received: list[ReceivedSms] = []
        self.commands: list[str] = []
        self.raw = bytearray()
        self._master, self._slave = os.openpty()
        # Raw mode before anyone opens the slave: the line discipline must neither echo nor
        # turn CR into LF behind our back (pyserial sets raw too, but only once it opens).
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.port = os.ttyname(self._slave)
        self._echo = self.script.echo
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reference = 0

    async def __aenter__(self) -> PtyModem:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._readable)
        self._task = self._loop.create_task(self._serve(), name=f"pty-modem {self.port}")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._master)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def inject(self, line: str) -> None:
        """Send an unsolicited line now (e.g. '+CMTI: "SM",3')."""
        self._send(f"\r\n{line}\r\n")

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            # EIO: the slave side went away; nothing more will come.
            if self._loop is not None:
                self._loop.remove_reader(self._master)
            return
        if data:
            self._queue.put_nowait(data)

    async def _serve(self) -> None:
        buffer = bytearray()
        number: str | None = None  # set while taking SMS text after the > prompt
        while True:
            chunk = await self._queue.get()
            self.raw += chunk
            buffer += chunk
            while buffer:
                if number is not None:
                    end = next((i for i, b in enumerate(buffer) if b in (0x1A, 0x1B)), -1)
                    if end < 0:
                        break
                    payload = bytes(buffer[: end + 1])
                    del buffer[: end + 1]
                    if self._echo and not self.script.silent:
                        self._send_bytes(payload[:-1])
                    if payload[-1] == 0x1A:
                        text = payload[:-1].decode("ascii", errors="replace")
                        self.received.append(self._read(number, text, payload))
                        await self._after_text()
                    number = None
                    continue
                end = buffer.find(b"\r")
                if end < 0:
                    break
                line = buffer[:end].decode("ascii", errors="replace").strip("\n").strip()
                del buffer[: end + 1]
                if line:
                    number = await self._command(line)

    async def _command(self, line: str) -> str | None:
        """Answer one command; returns the SMS number if the > prompt was given."""
        self.commands.append(line)
        script = self.script
        if script.silent:
            return None
        if self._echo:
            self._send(line + "\r")
        if script.reply_delay_s:
            await asyncio.sleep(script.reply_delay_s)
        self._unsolicited()
        upper = line.upper()
        if upper == "AT" or upper.startswith(("AT+CMGF=", "AT+CSCS=", "AT+CMEE=")):
            self._final("OK")
        elif upper in ("ATE0", "ATE1"):
            if upper == "ATE1" or script.honour_ate0:
                self._echo = upper == "ATE1"
            self._final("OK")
        elif upper == "AT+CGMM":
            self._info(script.model)
        elif upper == "AT+CPIN?":
            if script.sim_ready:
                self._info("+CPIN: READY")
            else:
                self._final("+CME ERROR: 10")
        elif upper == "AT+CSQ":
            self._info(f"+CSQ: {script.csq}")
        elif upper == "AT+CREG?":
            self._info(f"+CREG: {script.creg}")
        elif match := _CMGS_CMD.fullmatch(line) or _CMGS_PDU.fullmatch(line):
            if script.cmgs == "error":
                self._final("ERROR")
            elif script.cmgs != "silent":
                self._send("\r\n> ")
                # a PDU's length is told from a number by its "=" (see _read)
                return match.group(1) if match.re is _CMGS_CMD else "=" + match.group(1)
        else:
            self._final("ERROR")
        return None

    @staticmethod
    def _read(given: str, text: str, payload: bytes) -> ReceivedSms:
        """`given`: the quoted number (text mode) or "=" and the TPDU length (PDU mode)."""
        if not given.startswith("="):
            return ReceivedSms(given, text, payload)
        submitted = read_submit(text)
        return ReceivedSms(
            submitted.number, submitted.text, payload, int(given[1:]), submitted.part
        )

    async def _after_text(self) -> None:
        script = self.script
        if script.silent or script.cmgs == "silent_after_text":
            return
        if script.reply_delay_s:
            await asyncio.sleep(script.reply_delay_s)
        self._unsolicited()
        if script.cmgs == "cms_error":
            self._final(f"+CMS ERROR: {script.cms_error}")
            return
        self._reference = (self._reference + 1) % 256
        self._info(f"+CMGS: {self._reference}")

    def _info(self, line: str) -> None:
        self._send(f"\r\n{line}\r\n")
        self._unsolicited()
        self._final("OK")

    def _final(self, line: str) -> None:
        self._send(f"\r\n{line}\r\n")

    def _unsolicited(self) -> None:
        if self.script.unsolicited:
            self._send('\r\n+CMTI: "SM",1\r\n')

    def _send(self, text: str) -> None:
        self._send_bytes(text.encode("ascii"))

    def _send_bytes(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._master, data)
