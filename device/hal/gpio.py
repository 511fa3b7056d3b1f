"""gpiozero adapters: buttons, tamper and power sense in; status LED, discreet LED and buzzer out.

gpiozero calls back on its own threads (edge and hold threads; with the mock factory, an
edge fires in whatever thread drives the pin). Everything that crosses into the agent goes
through `GpiozeroInputs._post`, the one place that hops onto the event loop.

gpiozero is imported inside the constructors, so importing this module costs nothing on a
machine (or in a simulator) that never drives a pin.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from device.hal.config import HardwareConfig
from device.hal.indicator import Blink, resolve
from device.hal.ports import (
    ButtonName,
    InputEvent,
    InputKind,
    InputName,
    InputSink,
    Pattern,
    PinError,
)

log = logging.getLogger(__name__)


def _make(key: str, pin: int, factory: Callable[[], Any]) -> Any:
    """Create one gpiozero device, turning its failure into a PinError that names the key."""
    try:
        return factory()
    except Exception as exc:
        raise PinError(
            key,
            pin,
            f"{type(exc).__name__}: {exc}; check the pin number and that no other program uses it",
        ) from exc


class GpiozeroInputs:
    """Inputs on real pins (or on gpiozero's MockFactory in tests).

    Devices are created in the constructor so a wrong pin fails at start-up; callbacks are
    attached in `start`, so nothing reaches the agent before it asks.
    """

    def __init__(
        self,
        config: HardwareConfig,
        loop: asyncio.AbstractEventLoop,
        pin_factory: object | None = None,
    ) -> None:
        from gpiozero import Button, DigitalInputDevice

        self._loop = loop
        self._sink: InputSink | None = None
        self._closed = False
        # Press times on time.monotonic(), written by the edge thread and read by the hold
        # thread; single dict operations are atomic under the GIL, which is all we need.
        self._down_since: dict[ButtonName, float] = {}
        self._buttons: dict[ButtonName, Any] = {}
        self._tamper: Any = None
        self._power: Any = None
        bounce = config.bounce_s or None

        def open_input(device_class: Any, key: str, pin: int, **options: Any) -> Any:
            """A gpiozero input on `pin` with the configured debounce and pin factory."""
            return _make(
                key,
                pin,
                partial(device_class, pin, bounce_time=bounce, pin_factory=pin_factory, **options),
            )

        try:
            wired: tuple[tuple[ButtonName, str, int | None], ...] = (
                ("emergency", "emergency_pin", config.emergency_pin),
                ("doorbell", "doorbell_pin", config.doorbell_pin),
            )
            for name, key, pin in wired:
                if pin is None:
                    continue
                self._buttons[name] = open_input(
                    Button,
                    key,
                    pin,
                    pull_up=config.pull_up,
                    hold_time=config.hold_repeat_s,
                    hold_repeat=True,
                )
            if config.tamper_pin is not None:
                # Active = switch closed = case shut. A cut wire reads as opened: fail loud.
                self._tamper = open_input(
                    DigitalInputDevice, "tamper_pin", config.tamper_pin, pull_up=config.pull_up
                )
            if config.power_sense_pin is not None:
                # Active = on mains. The pull resistor pulls towards "no mains", so a broken
                # sense wire reports power lost rather than hiding a real outage.
                self._power = open_input(
                    DigitalInputDevice,
                    "power_sense_pin",
                    config.power_sense_pin,
                    pull_up=not config.power_sense_active_high,
                )
        except BaseException:
            self.close()
            raise

    def start(self, sink: InputSink) -> None:
        if self._closed:
            raise RuntimeError("GpiozeroInputs is closed; build a new one")
        self._sink = sink
        for name, button in self._buttons.items():
            button.when_pressed = partial(self._pressed, name)
            button.when_held = partial(self._held, name)
            button.when_released = partial(self._released, name)
        if self._tamper is not None:
            self._tamper.when_activated = partial(self._post, "tamper", "closed")
            self._tamper.when_deactivated = partial(self._post, "tamper", "opened")
        if self._power is not None:
            self._power.when_activated = partial(self._post, "power", "power_restored")
            self._power.when_deactivated = partial(self._post, "power", "power_lost")

    def close(self) -> None:
        self._closed = True
        self._sink = None
        devices = [*self._buttons.values(), self._tamper, self._power]
        for device in devices:
            if device is not None:
                device.close()
        self._buttons.clear()
        self._tamper = self._power = None

    def power_on_mains(self) -> bool:
        # No sense pin: we cannot tell, and claiming an outage would raise false alerts.
        return True if self._power is None else bool(self._power.is_active)

    def tamper_open(self) -> bool:
        return False if self._tamper is None else not self._tamper.is_active

    # Called on gpiozero threads.

    def _pressed(self, name: ButtonName) -> None:
        self._down_since[name] = time.monotonic()
        self._post(name, "pressed")

    def _held(self, name: ButtonName) -> None:
        since = self._down_since.get(name)
        if since is None:
            # The hold thread lost a race with the release; the release already said it all.
            return
        self._post(name, "held", time.monotonic() - since)

    def _released(self, name: ButtonName) -> None:
        held_for = self._seconds_down(name)
        self._down_since.pop(name, None)
        self._post(name, "released", held_for)

    def _seconds_down(self, name: ButtonName) -> float:
        since = self._down_since.get(name)
        return 0.0 if since is None else time.monotonic() - since

    def _post(self, name: InputName, kind: InputKind, held_for: float = 0.0) -> None:
        """The one bridge from gpiozero's threads to the event loop."""
        sink = self._sink
        if sink is None:
            return
        try:
            self._loop.call_soon_threadsafe(sink, InputEvent(name, kind, held_for))
        except RuntimeError:
            # The loop is closed: we are shutting down and nobody is listening any more.
            log.debug("input %s %s after the event loop closed; dropped", name, kind)


def _dim_blink(level: float, blink: Blink) -> tuple[Iterator[float], float]:
    """Values and step for a PWM `source` that blinks at `level` brightness.

    gpiozero's own blink always lights fully; the discreet LED must stay dim, so we feed
    the duty cycle ourselves, one value per step.
    """
    step = min(blink.on_s, blink.off_s)
    cycle = [level] * max(1, round(blink.on_s / step)) + [0.0] * max(1, round(blink.off_s / step))
    cycles: Iterator[list[float]] = (
        itertools.repeat(cycle) if blink.n is None else itertools.repeat(cycle, blink.n)
    )
    return itertools.chain(itertools.chain.from_iterable(cycles), [0.0]), step


class GpiozeroIndicator:
    """Status LED (single or RGB), discreet PWM LED and buzzer on gpiozero."""

    def __init__(self, config: HardwareConfig, pin_factory: object | None = None) -> None:
        from gpiozero import LED, PWMLED, RGBLED, Buzzer

        self._level = config.discreet_led_level
        self._led: Any = None
        self._rgb: Any = None
        self._discreet: Any = None
        self._buzzer: Any = None
        try:
            if config.led_pin is not None:
                self._led = _make(
                    "led_pin", config.led_pin, partial(LED, config.led_pin, pin_factory=pin_factory)
                )
            if (
                config.led_red_pin is not None
                and config.led_green_pin is not None
                and config.led_blue_pin is not None
            ):
                # pwm=False: the table uses full on/off colours, and plain pins work everywhere.
                self._rgb = _make(
                    "led_red_pin",
                    config.led_red_pin,
                    partial(
                        RGBLED,
                        config.led_red_pin,
                        config.led_green_pin,
                        config.led_blue_pin,
                        pwm=False,
                        pin_factory=pin_factory,
                    ),
                )
            if config.discreet_led_pin is not None:
                self._discreet = _make(
                    "discreet_led_pin",
                    config.discreet_led_pin,
                    partial(PWMLED, config.discreet_led_pin, pin_factory=pin_factory),
                )
            if config.buzzer_pin is not None:
                self._buzzer = _make(
                    "buzzer_pin",
                    config.buzzer_pin,
                    partial(Buzzer, config.buzzer_pin, pin_factory=pin_factory),
                )
        except BaseException:
            self.close()
            raise

    def show(self, pattern: Pattern, *, silent: bool, discreet_led: bool = False) -> None:
        self._all_off()
        out = resolve(
            pattern,
            silent=silent,
            discreet_led=discreet_led,
            has_discreet_led=self._discreet is not None,
        )
        if out.led is not None:
            if self._rgb is not None:
                if out.led.steady:
                    self._rgb.value = out.colour
                else:
                    self._rgb.blink(
                        on_time=out.led.on_s,
                        off_time=out.led.off_s,
                        on_color=out.colour,
                        n=out.led.n,
                    )
            elif self._led is not None:
                _blink(self._led, out.led)
        if out.buzzer is not None and self._buzzer is not None:
            _blink(self._buzzer, out.buzzer)
        if out.discreet is not None and self._discreet is not None:
            if out.discreet.steady:
                self._discreet.value = self._level
            else:
                values, step = _dim_blink(self._level, out.discreet)
                self._discreet.source_delay = step
                self._discreet.source = values

    def close(self) -> None:
        for device in (self._led, self._rgb, self._discreet, self._buzzer):
            if device is not None:
                device.close()
        self._led = self._rgb = self._discreet = self._buzzer = None

    def _all_off(self) -> None:
        # Stop the previous pattern's threads before anything new lights or sounds.
        if self._discreet is not None:
            self._discreet.source = None
        for device in (self._led, self._rgb, self._discreet, self._buzzer):
            if device is not None:
                device.off()


def _blink(device: Any, blink: Blink) -> None:
    if blink.steady:
        device.on()
    else:
        device.blink(on_time=blink.on_s, off_time=blink.off_s, n=blink.n)
