"""The ports: what the agent may ask of the hardware, and the values that cross them.

The agent's state machine sees only these protocols. Real adapters (gpiozero, picamera2,
pyserial) and fakes (simulator, tests) implement them, so the same agent logic runs on a
Raspberry Pi, on a desk and ten thousand times in one simulator process.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from device.errors import DeviceError
from protocol.messages import SimState

# AT+CMGF: "text" (GSM 7-bit, ASCII only) or "pdu" (UCS-2, any script)
SmsMode = Literal["text", "pdu"]
InputName = Literal["emergency", "doorbell", "tamper", "power"]
ButtonName = Literal["emergency", "doorbell"]
InputKind = Literal[
    "pressed", "released", "held", "opened", "closed", "power_lost", "power_restored"
]


@dataclass(frozen=True, slots=True)
class InputEvent:
    """One edge (or hold tick) on an input, as the agent receives it."""

    input: InputName
    kind: InputKind
    # Seconds the button has been down; set for `held` and `released`, 0.0 otherwise.
    held_for: float = 0.0


# Adapters call the sink on the event loop thread only, so agent code needs no locks.
InputSink = Callable[[InputEvent], None]


class Inputs(Protocol):
    """Buttons, tamper switch and power sense.

    Buttons report `pressed` on the edge, `held` every `hold_repeat_s` while still down (with
    `held_for`), and `released` (with `held_for`). What a 3 s or 10 s hold means is the
    agent's business, not the hardware's. Tamper reports `opened`/`closed`, power sense
    `power_lost`/`power_restored`.
    """

    def start(self, sink: InputSink) -> None: ...

    def close(self) -> None: ...

    def power_on_mains(self) -> bool: ...

    def tamper_open(self) -> bool: ...


class Pattern(enum.StrEnum):
    """What the indicator shows; `device/hal/indicator.py` maps each to light and sound."""

    OFF = "off"
    SENDING = "sending"
    RECEIVED = "received"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    DISPATCHED = "dispatched"
    LINK_DOWN = "link_down"
    RING = "ring"
    CANCELLED = "cancelled"
    SELFTEST = "selftest"
    # the alert has not reached the centre in time: the SMS fallback is sending it
    SMS_TRYING = "sms_trying"
    # the SMS fallback reached at least one number; MQTT still tries for the centre
    SMS_SENT = "sms_sent"


class Indicator(Protocol):
    """LED(s) and buzzer.

    `silent=True` means no sound and no light at all; the one exception is
    `discreet_led=True`, which lets only the discreet LED show, dim and slow.
    """

    def show(self, pattern: Pattern, *, silent: bool, discreet_led: bool = False) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Frame:
    """One raw video frame: planar YUV 4:2:0 (Y plane, then U, then V)."""

    width: int
    height: int
    format: Literal["yuv420p"]
    data: bytes
    # Seconds on the event loop's clock (monotonic) when the frame was taken.
    timestamp: float


class Camera(Protocol):
    name: str
    width: int
    height: int
    fps: int

    def start(self) -> None: ...

    def stop(self) -> None: ...

    async def capture(self) -> Frame:
        """The next frame, paced to `fps`."""
        ...


class AudioOutput(Protocol):
    """The doorbell's speaker, for an operator's talk-back: 16-bit signed PCM, interleaved."""

    name: str

    def start(self, sample_rate: int, channels: int) -> None: ...

    def play(self, pcm: bytes) -> None:
        """Queue `pcm` (whole frames) for playing; must not block the event loop for long."""
        ...

    def stop(self) -> None: ...


class AudioInput(Protocol):
    """The doorbell's microphone, for the desk: 20 ms of 16-bit mono PCM at a time."""

    name: str
    sample_rate: int

    def start(self) -> None: ...

    async def read(self) -> bytes:
        """The next 20 ms (sample_rate // 50 samples), paced by the device."""
        ...

    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModemInfo:
    """What `Modem.probe` found out."""

    model: str
    # True when the modem answered, accepted SMS text mode and its SIM is ready.
    ok: bool
    # AT+CSQ rssi 0..31 (higher is better), None when the modem does not know.
    signal: int | None
    sim: SimState = "unknown"
    # AT+CREG? on the home network or roaming; None when the modem does not say.
    registered: bool | None = None


class Modem(Protocol):
    """A cellular modem used as the SMS fallback path."""

    async def probe(self) -> ModemInfo: ...

    async def signal_quality(self) -> int | None: ...

    async def send_sms(self, number: str, text: str, *, mode: SmsMode = "text") -> int:
        """Send one SMS; returns the modem's message reference (the first part's).

        `text`: ASCII in GSM 7-bit text mode; `pdu`: UCS-2 (Korean), split into
        concatenated parts where it must be."""
        ...

    async def close(self) -> None: ...


class HalError(DeviceError):
    """Root of every hardware-layer error."""


class PinError(HalError, OSError):
    """A GPIO pin could not be set up or used; names the config key and the pin."""

    def __init__(self, key: str, pin: int, problem: str) -> None:
        super().__init__(f"{key} (GPIO{pin}): {problem}")
        self.key = key
        self.pin = pin


class CameraUnavailable(HalError, RuntimeError):
    """The requested camera cannot be used; the message says how to fix it."""


class AudioUnavailable(HalError, RuntimeError):
    """No speaker can be opened (the message says which device and what to do)."""


class ModemError(HalError, OSError):
    """The modem or its serial port failed; names the port."""

    def __init__(self, port: str, problem: str) -> None:
        super().__init__(f"modem on {port}: {problem}")
        self.port = port


class ModemTimeout(ModemError, TimeoutError):
    """The modem did not answer a command within the timeout."""

    def __init__(self, port: str, command: str, timeout_s: float) -> None:
        super().__init__(port, f"no answer to {command} within {timeout_s:g} s")
        self.command = command
        self.timeout_s = timeout_s


class ModemRejected(ModemError):
    """The modem answered a command with ERROR, +CME ERROR or +CMS ERROR.

    `command` never contains a phone number (personal data): the number is replaced by `…`.
    """

    def __init__(
        self,
        port: str,
        command: str,
        reply: str,
        *,
        cms_error: int | None = None,
        cme_error: int | None = None,
    ) -> None:
        super().__init__(port, f"{command} rejected: {reply}")
        self.command = command
        self.reply = reply
        self.cms_error = cms_error
        self.cme_error = cme_error


class InvalidPhoneNumber(HalError, ValueError):
    """A phone number is not E.164-like; the message never repeats the number itself."""
