"""Hardware configuration: which adapters to use and where things are wired.

Pins are BCM GPIO numbers (0..27 on a 40-pin header). Defaults describe the reference
emergency bell: one button on GPIO17, nothing else wired, so an unset option never drives
a pin nobody connected.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Every pin key, in the order clashes are reported.
PIN_KEYS = (
    "emergency_pin",
    "doorbell_pin",
    "tamper_pin",
    "power_sense_pin",
    "led_pin",
    "led_red_pin",
    "led_green_pin",
    "led_blue_pin",
    "discreet_led_pin",
    "buzzer_pin",
)


class HardwareConfig(BaseModel):
    """The `[hardware]` table of device.toml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "gpiozero" drives real pins; "fake" uses in-memory fakes (simulator, desk demos).
    driver: Literal["gpiozero", "fake"] = "gpiozero"

    # Emergency (panic) button; None if this device has none.
    emergency_pin: int | None = Field(default=17, ge=0, le=27)
    # Doorbell button; None if this device is not a doorbell.
    doorbell_pin: int | None = Field(default=None, ge=0, le=27)
    # Tamper switch, closed while the case is shut; None if not fitted.
    tamper_pin: int | None = Field(default=None, ge=0, le=27)
    # Mains sense input (e.g. from a UPS HAT or an optocoupler); None if not fitted.
    power_sense_pin: int | None = Field(default=None, ge=0, le=27)
    # True if the power sense pin reads high while on mains (pulled down otherwise).
    power_sense_active_high: bool = True
    # Single-colour status LED; leave None when an RGB LED is wired instead.
    led_pin: int | None = Field(default=None, ge=0, le=27)
    # RGB status LED: red, green and blue pins, all three or none.
    led_red_pin: int | None = Field(default=None, ge=0, le=27)
    led_green_pin: int | None = Field(default=None, ge=0, le=27)
    led_blue_pin: int | None = Field(default=None, ge=0, le=27)
    # Small LED that may glow dimly in silent mode (PWM); None if not fitted.
    discreet_led_pin: int | None = Field(default=None, ge=0, le=27)
    # Brightness (PWM duty cycle) of the discreet LED when it shows.
    discreet_led_level: float = Field(default=0.1, gt=0.0, le=1.0)
    # Buzzer (active, driven on/off); None if not fitted.
    buzzer_pin: int | None = Field(default=None, ge=0, le=27)

    # Buttons and switches connect the pin to ground, with the Pi's internal pull-up.
    pull_up: bool = True
    # Ignore contact bounce shorter than this, in seconds.
    bounce_s: float = Field(default=0.05, ge=0.0, le=1.0)
    # A held button reports `held` this often, in seconds.
    hold_repeat_s: float = Field(default=1.0, gt=0.0, le=60.0)

    # Camera: picamera2 if present else synthetic ("auto"), insist on one, or none at all.
    camera: Literal["auto", "picamera2", "synthetic", "none"] = "auto"
    # Frame width in pixels (even, for YUV 4:2:0).
    camera_width: int = Field(default=640, ge=16, le=4096, multiple_of=2)
    # Frame height in pixels (even, for YUV 4:2:0).
    camera_height: int = Field(default=480, ge=16, le=4096, multiple_of=2)
    # Frames per second.
    camera_fps: int = Field(default=15, ge=1, le=60)
    # Speaker for an operator's talk-back: an ALSA device, a fake that records, or none.
    speaker: Literal["none", "alsa", "fake"] = "none"
    # ALSA device name of the speaker (`aplay -L` lists them).
    speaker_device: str = "default"
    # Microphone for the desk to listen at the door: an ALSA device, a fake hum, or none.
    microphone: Literal["none", "alsa", "fake"] = "none"
    # ALSA device name of the microphone (`arecord -L` lists them).
    microphone_device: str = "default"

    # Serial device or pyserial URL of the SMS modem (e.g. /dev/ttyUSB2); None: no modem.
    modem_port: str | None = None
    # Modem serial speed.
    modem_baudrate: int = Field(default=115200, gt=0)
    # RS-485 half-duplex mode for the serial port (fails on ports that do not support it).
    modem_rs485: bool = False
    # Seconds to wait for the modem to answer an ordinary AT command.
    modem_timeout_s: float = Field(default=10.0, gt=0.0)
    # Seconds to wait for the network to accept an SMS (AT+CMGS may take up to 60 s).
    modem_sms_timeout_s: float = Field(default=60.0, gt=0.0)

    @model_validator(mode="after")
    def _pins_make_sense(self) -> HardwareConfig:
        # Two functions on one pin would make gpiozero fail at start-up with a less helpful
        # message, or worse, an output driving a button's input.
        seen: dict[int, str] = {}
        for key in PIN_KEYS:
            pin = getattr(self, key)
            if pin is None:
                continue
            if pin in seen:
                raise ValueError(f"{seen[pin]} and {key} are both GPIO{pin}; give each its own pin")
            seen[pin] = key
        rgb = (self.led_red_pin, self.led_green_pin, self.led_blue_pin)
        if any(p is not None for p in rgb) and any(p is None for p in rgb):
            raise ValueError(
                "led_red_pin, led_green_pin and led_blue_pin go together: set all three or none"
            )
        if self.led_pin is not None and rgb[0] is not None:
            raise ValueError("set either led_pin (single colour) or the three led_*_pin (RGB)")
        return self

    @property
    def has_rgb_led(self) -> bool:
        return self.led_red_pin is not None
