"""What each indicator pattern looks and sounds like, and the silent rule.

One table and one function, shared by the gpiozero adapter and the fake, so the simulator
and the tests see exactly what a person at the device would see and hear.

Reading the table: the status LED blinks `on_s` seconds on, `off_s` off, `n` times (None:
until the next pattern; `STEADY`: on without blinking). The colour is used by an RGB LED; a
single-colour LED just follows the timing. The buzzer column uses the same timing notation
(beeps). The discreet column is what the discreet LED shows, dimly, in silent mode when the
agent allows it; it is dark otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from device.hal.ports import Pattern

RGB = tuple[int, int, int]

BLACK: Final[RGB] = (0, 0, 0)
RED: Final[RGB] = (1, 0, 0)
GREEN: Final[RGB] = (0, 1, 0)
BLUE: Final[RGB] = (0, 0, 1)
YELLOW: Final[RGB] = (1, 1, 0)
WHITE: Final[RGB] = (1, 1, 1)
CYAN: Final[RGB] = (0, 1, 1)


@dataclass(frozen=True, slots=True)
class Blink:
    """On for `on_s`, off for `off_s`, `n` times (None: until the next pattern)."""

    on_s: float
    off_s: float
    n: int | None = None

    @property
    def steady(self) -> bool:
        return self.off_s == 0.0


# On until the next pattern.
STEADY: Final = Blink(on_s=0.0, off_s=0.0)


@dataclass(frozen=True, slots=True)
class Look:
    """One row of the table: everything a pattern may use, before the silent rule."""

    colour: RGB
    led: Blink | None
    beep: Blink | None
    discreet: Blink | None


_: Final[None] = None  # a blank cell in the table

# Why these choices: yellow = in progress, green = help is on the way (the longer it stays
# on, the further the alert got), red = trouble, blue = doorbell, white = housekeeping.
# Beeps confirm each stage once; nothing beeps forever, so a frightened person is not also
# deafened. The discreet LED never reveals link trouble or the doorbell: during a hold-up it
# only tells the person that their alert is moving and, once steady, that help is coming.
# The SMS fallback: red (trouble, the centre has not got it yet) blinking at 1 Hz while the
# SMS goes out, without a beep; cyan (a person's phone has it) once sent, with a beep of
# its own. Silent mode shows nothing of them (their discreet cells are blank, and the
# behaviour keeps the incident's own pattern when silent): a hold-up's attacker must not
# learn that a second path exists.
# fmt: off
PATTERNS: Final[Mapping[Pattern, Look]] = {
    #                          colour  status LED          buzzer              discreet LED
    Pattern.OFF:          Look(BLACK,  _,                  _,                  _),
    Pattern.SENDING:      Look(YELLOW, Blink(0.25, 0.25),  Blink(0.1, 0.1, 1), Blink(0.1, 2.9)),
    Pattern.RECEIVED:     Look(YELLOW, Blink(1.0, 1.0),    Blink(0.1, 0.1, 1), Blink(0.5, 2.5)),
    Pattern.DELIVERED:    Look(GREEN,  Blink(0.5, 1.5),    Blink(0.1, 0.1, 2), Blink(0.5, 2.5)),
    Pattern.ACKNOWLEDGED: Look(GREEN,  Blink(1.5, 0.5),    Blink(0.1, 0.1, 3), STEADY),
    Pattern.DISPATCHED:   Look(GREEN,  STEADY,             Blink(1.0, 0.1, 1), STEADY),
    Pattern.LINK_DOWN:    Look(RED,    Blink(0.1, 2.9),    _,                  _),
    Pattern.RING:         Look(BLUE,   Blink(0.2, 0.2, 5), Blink(0.3, 0.2, 2), _),
    Pattern.CANCELLED:    Look(WHITE,  Blink(0.3, 0.3, 2), Blink(0.5, 0.1, 1), Blink(0.1, 0.3, 2)),
    Pattern.SELFTEST:     Look(WHITE,  Blink(0.2, 0.2, 3), Blink(0.1, 0.1, 1), Blink(0.2, 0.2, 3)),
    Pattern.SMS_TRYING:   Look(RED,    Blink(0.5, 0.5),    _,                  _),
    Pattern.SMS_SENT:     Look(CYAN,   Blink(1.0, 0.5),    Blink(0.3, 0.1, 2), _),
}
# fmt: on


@dataclass(frozen=True, slots=True)
class Output:
    """What the outputs do for a pattern once the silent rule is applied."""

    colour: RGB
    led: Blink | None
    buzzer: Blink | None
    discreet: Blink | None

    @property
    def lit(self) -> bool:
        return self.led is not None or self.discreet is not None


DARK: Final = Output(BLACK, None, None, None)


def resolve(
    pattern: Pattern, *, silent: bool, discreet_led: bool, has_discreet_led: bool = True
) -> Output:
    """Apply the silent rule to a pattern's row.

    Audible: status LED and buzzer as in the table, discreet LED dark. Silent: nothing at
    all, except the discreet LED's column when the agent allows it and one is fitted.
    """
    look = PATTERNS[pattern]
    if not silent:
        return Output(look.colour, look.led, look.beep, None)
    if discreet_led and has_discreet_led and look.discreet is not None:
        return Output(BLACK, None, None, look.discreet)
    return DARK
