"""SMS through a cellular modem: an AT-command driver on pyserial.

Serial I/O blocks, so each command runs whole in a worker thread (`asyncio.to_thread`).
An `asyncio.Lock` keeps callers queued on the loop, one command at a time; a
`threading.Lock` keeps it so even when a caller is cancelled while its thread is still
talking to the modem.

The port is opened with `serial.serial_for_url`, so a device path, a pty (the `PtyModem`
fake) and `socket://host:port` all work.

Phone numbers and message texts are personal data: they are never logged and never put in
an exception message. Logs carry counts and the modem's message reference only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from device.hal.pdu import Pdu, submit_pdus
from device.hal.ports import (
    InvalidPhoneNumber,
    ModemError,
    ModemInfo,
    ModemRejected,
    ModemTimeout,
    SmsMode,
)
from protocol.messages import SimState

log = logging.getLogger(__name__)

T = TypeVar("T")

CTRL_Z = b"\x1a"  # ends the SMS text and sends it
ESC = b"\x1b"  # abandons the SMS text without sending
SMS_MAX_SEPTETS = 160
_ELLIPSIS = "..."

_NUMBER = re.compile(r"\+?[0-9]{3,16}")
_FINAL_ERROR = re.compile(r"\+(CME|CMS) ERROR:\s*(.*)")
_CSQ = re.compile(r"(\d+)\s*,\s*(\d+)")
_CMGS = re.compile(r"\+CMGS:\s*(\d+)")
# "+CREG: <n>,<stat>[,<lac>,<ci>]"; 3GPP TS 27.007 7.2: every stat that can send an SMS,
# home or roaming: 1/5 registered, 6/7 "SMS only", 9/10 "CSFB not preferred" (LTE modems).
# 8 is "emergency services only": no SMS.
_CREG = re.compile(r"\s*\d+\s*,\s*(\d+)")
_REGISTERED = frozenset({1, 5, 6, 7, 9, 10})
# +CME ERROR codes of AT+CPIN? (3GPP TS 27.007 9.2): 10 SIM not inserted
_SIM_NOT_INSERTED = 10

# Characters of the GSM 03.38 default alphabet that are also ASCII, so they pass unchanged
# through the modem's "IRA" (ASCII) character set. The extension table costs two septets.
_GSM_BASIC = frozenset(
    "@$\n !\"#%&'()*+,-./0123456789:;<=>?ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
)
_GSM_EXTENSION = frozenset("^{}\\[~]|")


def check_number(number: str) -> str:
    """Return `number` if it looks like E.164 (optional +, 3..16 digits), else raise."""
    if not _NUMBER.fullmatch(number):
        # Say what is wrong without repeating it: it may be someone's real number.
        raise InvalidPhoneNumber(
            f"phone number of {len(number)} characters is not valid: expected an optional "
            "+ followed by 3 to 16 digits, no spaces or dashes"
        )
    return number


def prepare_sms_text(text: str) -> str:
    """Make `text` fit one GSM 7-bit SMS.

    The rule: line breaks become "\\n"; characters outside the ASCII part of the GSM
    alphabet become "?"; `^{}\\[~]|` count as two (GSM escape sequences); if the result
    is longer than 160 septets it is cut to 157 and "..." is appended.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    chars = [ch if ch in _GSM_BASIC or ch in _GSM_EXTENSION else "?" for ch in text]
    if sum(_septets(ch) for ch in chars) <= SMS_MAX_SEPTETS:
        return "".join(chars)
    budget = SMS_MAX_SEPTETS - len(_ELLIPSIS)
    kept: list[str] = []
    for ch in chars:
        budget -= _septets(ch)
        if budget < 0:
            break
        kept.append(ch)
    return "".join(kept) + _ELLIPSIS


def _septets(ch: str) -> int:
    return 2 if ch in _GSM_EXTENSION else 1


def parse_csq(value: str) -> int | None:
    """The rssi of an `AT+CSQ` answer ("21,0" -> 21); 99 (not known) and garbage -> None."""
    match = _CSQ.search(value)
    if match is None:
        return None
    rssi = int(match.group(1))
    return rssi if 0 <= rssi <= 31 else None


def parse_creg(value: str) -> bool | None:
    """Registered (home or roaming) from an `AT+CREG?` answer ("0,1" -> True); garbage -> None."""
    match = _CREG.match(value)
    if match is None:
        return None
    return int(match.group(1)) in _REGISTERED


def parse_cpin(value: str) -> SimState:
    """The SIM state of an `AT+CPIN?` answer ("READY", "SIM PIN", "SIM PUK", ...)."""
    value = value.strip().upper()
    if value == "READY":
        return "ready"
    if "PUK" in value:
        return "puk"
    if "PIN" in value:
        return "pin"
    return "error"


class _Timeout(Exception):
    """Internal: the deadline passed while reading; turned into ModemTimeout by the caller."""


class SerialModem:
    """An AT-command modem on a serial port, pty or `socket://` URL."""

    def __init__(
        self,
        port: str,
        baudrate: int = 115200,
        *,
        timeout_s: float = 5.0,
        rs485: bool = False,
        sms_timeout_s: float = 60.0,
    ) -> None:
        self.port = port
        self._baudrate = baudrate
        self._timeout_s = timeout_s
        # AT+CMGS waits for the network, which the 3GPP spec allows up to a minute.
        self._sms_timeout_s = sms_timeout_s
        self._rs485 = rs485
        self._serial: Any = None
        self._rx = bytearray()
        self._ready = False
        self._cmgf: int | None = None  # the message format last set (AT+CMGF)
        self._concat_ref = 0  # ties the parts of one concatenated SMS together
        self._lock = asyncio.Lock()
        self._io_lock = threading.Lock()

    async def probe(self) -> ModemInfo:
        """Initialise the modem and report model, readiness and signal.

        Raises ModemError if the port cannot be opened, ModemTimeout if the modem does not
        answer, ModemRejected if it refuses SMS text mode.
        """
        return await self._run(self._probe)

    async def signal_quality(self) -> int | None:
        return await self._run(self._signal_quality)

    async def send_sms(self, number: str, text: str, *, mode: SmsMode = "text") -> int:
        """Send `text` to `number`; returns the (first part's) message reference.

        `mode="text"`: one GSM 7-bit SMS (see `prepare_sms_text`); `"pdu"`: the text as
        it is, in UCS-2 and as many concatenated parts as it needs (`device/hal/pdu.py`).
        """
        check_number(number)  # before the lock and the port: nothing is written for a bad one
        if mode == "pdu":
            self._concat_ref = (self._concat_ref + 1) % 256
            pdus = submit_pdus(number, text, self._concat_ref)
            refs = await self._run(self._send_pdus, pdus)
            log.info(
                "SMS sent via %s in PDU mode: references %s, %d characters in %d part(s)",
                self.port,
                refs,
                len(text),
                len(pdus),
            )
            return refs[0]
        prepared = prepare_sms_text(text)
        ref = await self._run(self._send_sms, number, prepared)
        log.info(
            "SMS sent via %s: reference %d, %d characters (%d given)",
            self.port,
            ref,
            len(prepared),
            len(text),
        )
        return ref

    async def close(self) -> None:
        await self._run(self._close)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:
            return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        import serial

        with self._io_lock:
            try:
                return fn(*args)
            except ModemError:
                raise
            except (serial.SerialException, OSError) as exc:
                # A USB modem that re-enumerates leaves a dead handle: drop it, so the next
                # call opens the port afresh.
                self._close()
                raise ModemError(
                    self.port, f"serial I/O failed ({exc}); was the modem unplugged or reset?"
                ) from exc

    # Everything below runs in a worker thread, holding _io_lock.

    def _probe(self) -> ModemInfo:
        self._ensure_ready()
        try:
            lines = self._command("AT+CGMM", plain=True)
            model = lines[0] if lines else "unknown"
        except ModemRejected:
            model = "unknown"
        sim: SimState
        try:
            lines = self._command("AT+CPIN?", prefix="+CPIN:")
            sim = parse_cpin(lines[0]) if lines else "unknown"
        except ModemRejected as exc:
            # No SIM, or a broken one: the modem works but cannot send.
            sim = "absent" if exc.cme_error == _SIM_NOT_INSERTED else "error"
        try:
            lines = self._command("AT+CREG?", prefix="+CREG:")
            registered = parse_creg(lines[0]) if lines else None
        except ModemRejected:
            registered = None
        return ModemInfo(
            model=model,
            ok=sim == "ready",
            signal=self._signal_quality(),
            sim=sim,
            registered=registered,
        )

    def _signal_quality(self) -> int | None:
        self._ensure_ready()
        lines = self._command("AT+CSQ", prefix="+CSQ:")
        return parse_csq(lines[0]) if lines else None

    def _send_sms(self, number: str, text: str) -> int:
        self._ensure_ready()
        self._message_format(1)
        # what errors and logs may say instead of the command: no number
        return self._submit(f'AT+CMGS="{number}"', 'AT+CMGS="…"', text.encode("ascii"))

    def _send_pdus(self, pdus: list[Pdu]) -> list[int]:
        self._ensure_ready()
        self._message_format(0)
        # the PDU's hex holds the number: only the command (a length) may be shown
        return [
            self._submit(
                f"AT+CMGS={pdu.tpdu_octets}", f"AT+CMGS={pdu.tpdu_octets}", pdu.hex.encode()
            )
            for pdu in pdus
        ]

    def _message_format(self, cmgf: int) -> None:
        """AT+CMGF: 1 text, 0 PDU; said only when it changes."""
        if self._cmgf != cmgf:
            self._command(f"AT+CMGF={cmgf}")
            self._cmgf = cmgf

    def _submit(self, command: str, shown: str, body: bytes) -> int:
        """AT+CMGS: the command, its > prompt, the body and Ctrl-Z, the reference."""
        self._write(command)
        deadline = time.monotonic() + self._timeout_s
        try:
            while True:
                line = self._next_line(deadline, prompt=True)
                if line == ">":
                    break
                if line == "OK":
                    raise ModemError(self.port, f"{shown} answered OK without a > prompt")
                self._check_error(line, shown)
                # Echo and unsolicited result codes: not ours to answer.
        except _Timeout:
            # The modem may still enter text mode later; ESC makes sure nothing is sent.
            self._serial.write(ESC)
            self._ready = False
            raise ModemTimeout(self.port, shown, self._timeout_s) from None
        payload = body + CTRL_Z
        self._serial.write(payload)
        deadline = time.monotonic() + self._sms_timeout_s
        ref: int | None = None
        try:
            self._skip_echo(payload, deadline)
            while True:
                line = self._next_line(deadline)
                match = _CMGS.match(line)
                if match:
                    ref = int(match.group(1))
                    continue
                if line == "OK":
                    if ref is None:
                        raise ModemError(self.port, f"{shown} answered OK without +CMGS")
                    return ref
                self._check_error(line, shown)
        except _Timeout:
            self._ready = False
            raise ModemTimeout(self.port, f"{shown} (sending)", self._sms_timeout_s) from None

    def _ensure_ready(self) -> None:
        if self._serial is None:
            self._open()
        if self._ready:
            return
        # A modem that just powered up may swallow the first AT while it finds the baud rate:
        # try twice, within one timeout in all.
        first = min(1.0, self._timeout_s / 2)
        try:
            self._command("AT", timeout_s=first)
        except ModemTimeout:
            try:
                self._command("AT", timeout_s=self._timeout_s - first)
            except ModemTimeout:
                raise ModemTimeout(self.port, "AT", self._timeout_s) from None
        self._command("ATE0")
        self._command("AT+CMGF=1")
        self._cmgf = 1
        try:
            # Text goes over the wire as ASCII (see prepare_sms_text); most modems default to
            # this, some (Quectel) to "GSM", where @ and $ mean other bytes.
            self._command('AT+CSCS="IRA"')
        except ModemRejected:
            log.debug('modem on %s refused AT+CSCS="IRA"; keeping its default', self.port)
        self._ready = True

    def _open(self) -> None:
        import serial

        try:
            port = serial.serial_for_url(
                self.port,
                baudrate=self._baudrate,
                # Short reads let us check our own deadline between them.
                timeout=0.05,
                write_timeout=self._timeout_s,
                do_not_open=True,
            )
            if self._rs485:
                import serial.rs485

                port.rs485_mode = serial.rs485.RS485Settings()
            port.open()
        except (serial.SerialException, ValueError, OSError) as exc:
            fix = (
                "set modem_rs485 = false unless the modem is on an RS-485 adapter"
                if self._rs485
                else "check modem_port, that the user is in group dialout, and that no other "
                "program (e.g. ModemManager) holds the port"
            )
            raise ModemError(self.port, f"cannot open it ({exc}); {fix}") from exc
        self._serial = port
        self._rx.clear()

    def _close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        self._ready = False

    def _write(self, command: str) -> None:
        # Whatever is left from an earlier command that timed out would be read as this one's
        # answer; unsolicited codes in it are of no use to us either.
        self._serial.reset_input_buffer()
        self._rx.clear()
        self._serial.write(command.encode("ascii") + b"\r")

    def _command(
        self,
        command: str,
        *,
        prefix: str | None = None,
        plain: bool = False,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Send one command and return its information lines (without `prefix`).

        `prefix` picks lines like "+CSQ: 21,0"; `plain` picks lines without one (AT+CGMM).
        """
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        self._write(command)
        deadline = time.monotonic() + timeout_s
        lines: list[str] = []
        try:
            while True:
                line = self._next_line(deadline)
                if line == command:
                    continue  # echo, if the modem ignored ATE0
                if line == "OK":
                    return lines
                self._check_error(line, command)
                if prefix is not None and line.startswith(prefix):
                    lines.append(line[len(prefix) :].strip())
                elif line.startswith("+"):
                    # An unsolicited result code (+CMTI, +CREG, ...). Only its name is logged:
                    # some (+CMT, +CLIP) carry a caller's number.
                    log.debug("ignored unsolicited %s from %s", line.split(":")[0], self.port)
                elif plain:
                    lines.append(line)
        except _Timeout:
            self._ready = False
            raise ModemTimeout(self.port, command, timeout_s) from None

    def _check_error(self, line: str, command: str) -> None:
        if line == "ERROR":
            raise ModemRejected(self.port, command, line)
        match = _FINAL_ERROR.fullmatch(line)
        if match is None:
            return
        kind, detail = match.groups()
        code = int(detail) if detail.isdigit() else None
        if kind == "CMS":
            raise ModemRejected(self.port, command, line, cms_error=code)
        raise ModemRejected(self.port, command, line, cme_error=code)

    def _next_line(self, deadline: float, *, prompt: bool = False) -> str:
        """The next non-blank line, or ">" for the SMS text prompt when `prompt` is set."""
        while True:
            while self._rx and self._rx[0] in b"\r\n":
                del self._rx[:1]
            if prompt and self._rx[:1] == b">":
                # "> " has no line ending: it waits for us.
                del self._rx[: 2 if self._rx[1:2] == b" " else 1]
                return ">"
            ends = [i for i in (self._rx.find(b"\r"), self._rx.find(b"\n")) if i >= 0]
            if ends:
                end = min(ends)
                line = self._rx[:end].decode("ascii", errors="replace").strip()
                del self._rx[: end + 1]
                if line:
                    return line
                continue
            self._fill(deadline)

    def _skip_echo(self, payload: bytes, deadline: float) -> None:
        """Drop the modem's echo of the SMS text, if it echoes.

        Read line by line, an echoed text could look like an answer ("OK", "+CMGS: 1"). The
        text never starts with CR (prepare_sms_text), and every answer does, so the first
        byte tells an echo from an answer.
        """
        for expected in payload:
            while not self._rx:
                self._fill(deadline)
            if self._rx[0] != expected:
                return
            del self._rx[:1]

    def _fill(self, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise _Timeout
        chunk = self._serial.read(self._serial.in_waiting or 1)
        self._rx += chunk
