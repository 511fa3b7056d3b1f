"""Log levels for people: what `-v` and `-vv` mean for every `ansimi` command.

- default (INFO): each alert's life, one line per stage (sent, received, delivered,
  acknowledged, ...), and anything that needs a person (WARNING and above);
- `-v` (DECISION): also why the agent and the gateway do what they do (a press judged as
  urgent, a state change, a resend);
- `-vv` (DEBUG): everything, libraries included (paho, aiohttp, asyncio);
- media detail (every RTP packet, ICE check and SDP) only when asked by name:
  `--debug-log ansimi.webrtc.wire`. aiortc logs each packet at DEBUG: under plain `-vv`
  it would drown everything else.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import TextIO

DECISION = 15
logging.addLevelName(DECISION, "DECISION")

# this project's packages: they tell the alert's life at INFO and decisions at DECISION
OWN_PACKAGES = ("ansimi", "protocol", "device", "gateway", "provisioning", "simulator", "console")
# the named debug logger for media detail, and the libraries heard only through it
WIRE = "ansimi.webrtc.wire"
WIRE_LIBRARIES = ("aiortc", "aioice", "av")

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(
    verbose: int, debug_loggers: Sequence[str] = (), stream: TextIO | None = None
) -> None:
    """Set the levels for `verbose` (the count of -v) and the loggers named for debug."""
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format=FORMAT)
    own = logging.INFO if verbose <= 0 else DECISION if verbose == 1 else logging.DEBUG
    logging.getLogger().setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    for name in OWN_PACKAGES:
        logging.getLogger(name).setLevel(own)
    wire = logging.DEBUG if WIRE in debug_loggers else logging.WARNING
    for name in (WIRE, *WIRE_LIBRARIES):
        logging.getLogger(name).setLevel(wire)
    for name in debug_loggers:
        if name != WIRE:
            logging.getLogger(name).setLevel(logging.DEBUG)


class LogLimiter:
    """At most one log line per key an interval: what refuses or fails by the thousand
    (a flood of forged or replayed messages, a full disk) must not fill the disk it logs
    to. The caller counts everything in its metrics; this only says when to write a line.
    """

    KEYS_MAX = 10_000  # then forgotten all at once: a flood of new keys stays bounded

    def __init__(self, every_ms: int, clock_ms: Callable[[], int]) -> None:
        self._every_ms = every_ms
        self._clock_ms = clock_ms
        self._logged: dict[Hashable, tuple[int, int]] = {}

    def quiet(self, key: Hashable, count: int = 1) -> int | None:
        """None while `key` was logged within the interval (`count` more kept quiet), else
        how many were kept quiet since its last line: log now."""
        now_ms = self._clock_ms()
        last, quiet = self._logged.get(key, (None, 0))
        if last is not None and now_ms - last < self._every_ms:
            self._logged[key] = (last, quiet + count)
            return None
        if len(self._logged) >= self.KEYS_MAX:
            self._logged.clear()
        self._logged[key] = (now_ms, 0)
        return quiet

    @staticmethod
    def more(quiet: int) -> str:
        """The words a line adds for the ones kept quiet before it."""
        return f" (and {quiet} more since the last report)" if quiet else ""
