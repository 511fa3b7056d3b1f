"""SIA DC-09 bridge: alerts to existing alarm receivers, as one more kind of centre.

ANSI/SIA DC-09 over TCP. A message is one line:

    <LF> CRC LLLL "ID" SEQ Rrrr Lll #ACCT [ DATA ] _HH:MM:SS,MM-DD-YYYY <CR>

CRC is CRC-16/ARC (poly 0xA001 reflected, init 0) of everything from the first quote to
the end, printed as 4 upper-case hex digits; LLLL is that part's length in hex. DATA is
SIA-DCS (`#ACCT|Nri1/PA001`: a two-letter event code and a zone) or ADM-CID (Contact ID:
`#ACCT|1120 01 001`: qualifier 1 new / 3 restore, event, partition, zone).

Encrypted (`"*SIA-DCS"`): everything after `[` is AES-CBC with a zero IV over
`<pad>|DATA]_timestamp`, the pad being random characters other than `|[]` that bring the
length to a multiple of 16, sent as upper-case hex. This is what the receiver in
pysiaalarm (and the Ajax panels it talks to) expects, and it takes the configured key's
characters as the AES key bytes; `key_format = "hex"` decodes the key first instead.

The receiver answers ACK (done), NAK (our timestamp is outside its window; its own time
rides in the NAK: we adopt the offset, log the skew, and send again), or DUH (it does not
understand the account or code: a configuration problem, reported as a refusal).
One message in flight per connection, as the protocol wants; the outbox does the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.config import SiaReceiver
from gateway.errors import GatewayError
from gateway.incidents import kind_of
from gateway.store import Delivery
from gateway.transports.base import DELIVERED, Outcome
from protocol.clock import wall_ms

log = logging.getLogger(__name__)

TIME_FORMAT: Final = "%H:%M:%S,%m-%d-%Y"
_PAD_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
ZERO_IV: Final = bytes(16)
# a NAK answered with a corrected timestamp, at most this often per attempt
MAX_NAKS: Final = 2


@dataclass(frozen=True, slots=True)
class SiaEvent:
    """One event in both vocabularies: SIA-DCS letters and Contact ID numbers."""

    sia_code: str  # PA, HA, OC, TA, TR, AT, AR...
    qualifier: Literal["E", "R"]  # Contact ID: E new event / opening, R restore / closing
    cid_event: int  # Contact ID event code: 120 panic, 121 duress...


PANIC: Final = SiaEvent("PA", "E", 120)
DURESS: Final = SiaEvent("HA", "E", 121)  # hold-up / duress
OFFLINE_EVENT: Final = SiaEvent("YC", "E", 350)  # communication trouble
ONLINE_EVENT: Final = SiaEvent("YK", "R", 350)  # communication restored

# alert triggers; every one maps, so every alert reaches the receiver (an alert that is an
# incident kind takes the kind's code first: `KIND_EVENTS`)
ALERT_EVENTS: Final[dict[str, SiaEvent]] = {
    "press": PANIC,
    "long_press": PANIC,
    "duress": DURESS,
    "doorbell_ring": SiaEvent("UA", "E", 150),  # 24-hour non-burglary zone
    "tamper": SiaEvent("TA", "E", 137),
    "tamper_cleared": SiaEvent("TR", "R", 137),
    "power_loss": SiaEvent("AT", "E", 301),  # AC loss
    "power_restored": SiaEvent("AR", "R", 301),
    # a bell's own test press: manual test (SIA RX, Contact ID 601), so a receiver files it
    # as a test and never dispatches on it
    "test": SiaEvent("RX", "E", 601),
}
# Each incident kind as a receiver must file it, for the alert that is that kind and for the
# incident's escalation alike: a bell offline or a district gone dark is communication
# trouble, never a panic a receiver would dispatch the police on; a store's silent press a
# silent hold-up (Contact ID 122).
KIND_EVENTS: Final[dict[str, SiaEvent]] = {
    "duress": DURESS,
    "store_robbery": SiaEvent("HA", "E", 122),
    "stalking_urgent": PANIC,
    "stalking": PANIC,
    "doorbell_emergency": PANIC,  # a ring that became an emergency too
    "tamper": ALERT_EVENTS["tamper"],
    "power_lost": ALERT_EVENTS["power_loss"],
    "district_outage": OFFLINE_EVENT,
    "offline": OFFLINE_EVENT,
    "doorbell_ring": ALERT_EVENTS["doorbell_ring"],
}
CANCEL_EVENT: Final = SiaEvent("OC", "E", 406)  # cancel by user
# the backup path (SMS) of a device, as a panel reports its second line (gateway/secondary.py)
STATUS_EVENTS: Final[dict[str, SiaEvent]] = {
    "offline": OFFLINE_EVENT,
    "online": ONLINE_EVENT,
    "secondary_path_down": SiaEvent("LT", "E", 352),  # line trouble; telco 2 fault
    "secondary_path_up": SiaEvent("LR", "R", 352),  # line restoral
    # a bell whose own test did not come through: communications trouble / failure to
    # communicate an event
    "test_failed": SiaEvent("YS", "E", 354),
    # service required, on the device's account: a renewal to see to before it goes dark
    "cert_expiring": SiaEvent("YX", "E", 300),
}


def sia_event(type_: str, body: dict[str, object]) -> SiaEvent | None:
    """The SIA event for a kept event, or None for what an alarm receiver has no use for."""
    if type_ == "alert":
        kind = kind_of("", type_, body)  # an alert names its bell
        return KIND_EVENTS[kind] if kind is not None else ALERT_EVENTS.get(str(body.get("trigger")))
    if type_ == "cancel":
        return CANCEL_EVENT
    if type_ == "status":
        return STATUS_EVENTS.get(str(body.get("state")))
    if type_ == "heartbeat":  # kept only when the power source changed
        return ALERT_EVENTS["power_loss" if body.get("power") == "battery" else "power_restored"]
    if type_ == "escalation":  # an incident nobody acknowledged, on this receiver's desk now
        # a kind a newer gateway made up: someone may be in trouble, so a panic
        return KIND_EVENTS.get(str(body.get("kind")), PANIC)
    return None


def crc16(data: bytes) -> int:
    """CRC-16/ARC, as DC-09 specifies: reflected polynomial 0xA001, initial value 0."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def timestamp(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime(TIME_FORMAT)


def aes_cbc(key: bytes, data: bytes, *, decrypt: bool = False) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(ZERO_IV))
    op = cipher.decryptor() if decrypt else cipher.encryptor()
    return op.update(data) + op.finalize()


def encrypt_data(key: bytes, plain: str, pad: Callable[[int], str] | None = None) -> str:
    """`<pad>|plain`, padded to whole AES blocks, encrypted, as upper-case hex."""
    pad = pad or _random_pad
    filler = pad((-(len(plain) + 1)) % 16)
    return aes_cbc(key, (filler + "|" + plain).encode("ascii")).hex().upper()


def _random_pad(n: int) -> str:
    return "".join(secrets.choice(_PAD_ALPHABET) for _ in range(n))


def frame(body: str) -> bytes:
    """Wrap `"ID"...` in LF, CRC, length and CR."""
    raw = body.encode("ascii")
    return b"\n" + f"{crc16(raw):04X}{len(raw):04X}".encode() + raw + b"\r"


def message_body(
    *,
    format: Literal["SIA-DCS", "ADM-CID"],
    seq: int,
    receiver: str | None,
    line: str,
    account: str,
    event: SiaEvent,
    at_ms: int,
    key: bytes | None,
    partition: int = 1,
    zone: int = 1,
    pad: Callable[[int], str] | None = None,
) -> str:
    """The part of a DC-09 message the CRC covers, from the first quote on."""
    account = account.upper()
    if format == "SIA-DCS":
        data = f"#{account}|Nri{partition}/{event.sia_code}{zone:03d}"
    else:
        qualifier = "1" if event.qualifier == "E" else "3"
        data = f"#{account}|{qualifier}{event.cid_event:03d} {partition:02d} {zone:03d}"
    rest = f"{data}]_{timestamp(at_ms)}"
    prefix = f"R{receiver.upper()}" if receiver else ""
    header = f"{seq:04d}{prefix}L{line.upper()}#{account}["
    if key is None:
        return f'"{format}"{header}{rest}'
    return f'"*{format}"{header}{encrypt_data(key, rest, pad)}'


# Between the sequence number and `[` come receiver, line and account; receivers differ in
# their order and spelling (pysiaalarm writes "L0R0", or "None" for an absent receiver),
# and only the kind and the sequence number matter here.
_RESPONSE = re.compile(r'"\*?(?P<kind>ACK|NAK|DUH|RSP)"(?P<seq>\d{4})[^\[\]"]{0,40}\[')
_TIME = re.compile(r"_(\d{2}:\d{2}:\d{2},\d{2}-\d{2}-\d{4})")


class BadResponse(GatewayError, ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Response:
    kind: Literal["ACK", "NAK", "DUH", "RSP"]
    seq: int
    time_ms: int | None  # the receiver's clock, when the response carries it (a NAK does)


def parse_response(line: bytes) -> Response:
    """A receiver's answer (LF CRC LLLL "ACK"... CR); BadResponse if it does not check out."""
    text = line.strip(b"\r\n").decode("ascii", "replace")
    if len(text) < 9:
        raise BadResponse(f"short response {text!r}")
    crc, body = text[:4], text[8:]
    if f"{crc16(body.encode('ascii', 'replace')):04X}" != crc.upper():
        raise BadResponse("response CRC does not match")
    match = _RESPONSE.match(body)
    if match is None:
        raise BadResponse(f"unrecognised response {body[:40]!r}")
    time_ms = None
    when = _TIME.search(body)
    if when is not None:
        try:
            parsed = dt.datetime.strptime(when.group(1), TIME_FORMAT).replace(tzinfo=dt.UTC)
            time_ms = int(parsed.timestamp() * 1000)
        except ValueError:
            pass
    kinds: dict[str, Literal["ACK", "NAK", "DUH", "RSP"]] = {
        "ACK": "ACK",
        "NAK": "NAK",
        "DUH": "DUH",
        "RSP": "RSP",
    }
    return Response(kinds[match.group("kind")], int(match.group("seq")), time_ms)


class SiaBridge:
    """One alarm receiver: a TCP connection, a sequence counter and a clock offset."""

    concurrency = 1  # one message in flight: DC-09 pairs each message with its answer

    def __init__(
        self,
        config: SiaReceiver,
        *,
        clock_ms: Callable[[], int] | None = None,
        pad: Callable[[int], str] | None = None,
    ) -> None:
        self.config = config
        self._clock_ms = clock_ms or wall_ms
        self._pad = pad
        self._key = config.aes_key
        self._seq = 0
        # receiver clock minus ours, learnt from NAKs
        self.offset_ms = 0
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def next_seq(self) -> int:
        self._seq = self._seq % 9999 + 1  # 0001..9999; 0000 is the receiver's
        return self._seq

    def encode(self, delivery: Delivery, seq: int) -> bytes | None:
        event = sia_event(delivery.type, json.loads(delivery.body_json))
        if event is None:
            return None
        cfg = self.config
        body = message_body(
            format=cfg.format,
            seq=seq,
            receiver=cfg.receiver,
            line=cfg.line,
            account=cfg.accounts.get(delivery.device_id, cfg.account),
            event=event,
            at_ms=self._clock_ms() + self.offset_ms,
            key=self._key,
            pad=self._pad,
        )
        return frame(body)

    async def send(self, delivery: Delivery, district: str) -> Outcome:
        async with self._lock:
            seq = self.next_seq()
            for _ in range(MAX_NAKS + 1):
                line = self.encode(delivery, seq)
                if line is None:
                    log.info("sia %s: nothing to send for a %s", self.config.name, delivery.type)
                    return DELIVERED
                try:
                    response = await self._exchange(line)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, BadResponse) as exc:
                    await self._drop()
                    return Outcome(f"sia: {type(exc).__name__}: {exc}")
                if response.kind in ("ACK", "RSP"):
                    if response.seq != seq:
                        await self._drop()
                        return Outcome(f"sia: ACK for sequence {response.seq}, sent {seq}")
                    return DELIVERED
                if response.kind == "DUH":
                    return Outcome("sia: receiver answered DUH (account or event)", True)
                self._adopt_time(response)
            return Outcome("sia: receiver keeps answering NAK")

    def _adopt_time(self, nak: Response) -> None:
        if nak.time_ms is None:
            return
        offset = nak.time_ms - self._clock_ms()
        log.warning(
            "sia %s: NAK; the receiver's clock is %+.1f s from ours: adopting it",
            self.config.name,
            offset / 1000,
        )
        self.offset_ms = offset

    async def _exchange(self, line: bytes) -> Response:
        reused = self._writer is not None and not self._writer.is_closing()
        try:
            return await self._exchange_once(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
        # A receiver may close a connection that sat idle; we learn it only when we write.
        # One more try on a fresh connection, so that this is not counted as a failure.
        await self._drop()
        return await self._exchange_once(line)

    async def _exchange_once(self, line: bytes) -> Response:
        timeout = self.config.ack_timeout_s
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.config.host, self.config.port), timeout
            )
        assert self._reader is not None and self._writer is not None
        self._writer.write(line)
        await self._writer.drain()
        answer = await asyncio.wait_for(self._reader.readuntil(b"\r"), timeout)
        return parse_response(answer)

    async def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def aclose(self) -> None:
        await self._drop()
