"""One way to read the wall clock in the wire's unit: `protocol.clock.wall_ms`.

Every part takes its clock as a parameter (`clock_ms=`) and defaults to `wall_ms`; a part
that computed milliseconds itself would be one more place where a rounding or a unit can
drift from the envelope's `ts`.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "ansimi_edge", "ansimi", "protocol", "siteca", "device", "gateway", "provisioning",
    "simulator", "console", "bench",
)  # fmt: skip
# milliseconds since the epoch made by hand, whatever the spacing or digit grouping
BY_HAND = re.compile(r"time_ns\(\)\s*//\s*1_?000_?000\b|time\.time\(\)\s*\*\s*1_?000\b")


def test_only_protocol_clock_turns_the_wall_clock_into_milliseconds() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if path != ROOT / "protocol" / "clock.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if BY_HAND.search(line)
    ]
    assert found == [], "use protocol.clock.wall_ms (or the clock_ms you were given)"
    assert BY_HAND.search((ROOT / "protocol" / "clock.py").read_text())  # the pattern holds
