"""The behaviour's two tables drawn as Mermaid state diagrams, for docs/behaviour.md.

The drawing is made from `TRANSITIONS` and `GESTURES` themselves, so it cannot tell a
different story from the code: `tests/unit/device/test_device_charts.py` fails when the
document is out of date. `python -m device.charts --write` writes it again.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Final

from device.behaviour import GESTURES, TRANSITIONS, Gesture, Phase

DOC: Final = Path(__file__).resolve().parents[1] / "docs" / "behaviour.md"


def _edges(rows: dict[tuple[str, str], list[str]]) -> list[str]:
    return [
        f"    {source} --> {target}: {' / '.join(labels)}"
        for (source, target), labels in sorted(rows.items())
    ]


def incident_chart() -> str:
    rows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (state, event), target in TRANSITIONS.items():
        rows[state.value, target.value].append(event.value)
    return "\n".join(["stateDiagram-v2", "    [*] --> idle", *_edges(rows)])


def gesture_chart() -> str:
    rows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for (phase, mark), (target, gesture) in GESTURES.items():
        meaning = "" if gesture is Gesture.NOTHING else f" → {gesture.value}"
        rows[phase.value, target.value].append(f"{mark.value}{meaning}")
    lines = [
        "stateDiagram-v2",
        f"    [*] --> {Phase.OPENING.value}: pressed, no incident → alert",
        f"    [*] --> {Phase.DURING.value}: pressed during an incident",
        *_edges(rows),
        f"    {Phase.DONE.value} --> [*]",
    ]
    return "\n".join(lines)


def document() -> str:
    return f"""# The device's behaviour, drawn from its tables

Generated from `device/behaviour.py` by `python -m device.charts --write`; do not edit by
hand (a test fails when this file and the tables disagree). The rules in words are in that
module's docstring.

## Incident states (`TRANSITIONS`)

An event the table does not list for a state raises `IllegalTransition`.

```mermaid
{incident_chart()}
```

## Emergency button gestures (`GESTURES`)

One press, from its edge to its release. A mark is what the button reports: still held or
released, and the longest of `long_press_s`, `cancel_hold_s`, `duress_hold_s` it has
reached (`[behaviour]` in device.toml). After the arrow, what the press means.

```mermaid
{gesture_chart()}
```

When the centre closes the incident while a press of it is down and still short of
`long_press_s` (the close crossed the press), the press is still judged by this chart when
it ends: a press or an urgent press then opens a new incident (its alert, and its urgency
once that alert is `received`); a cancel has nothing left to end and sends nothing. A
press already held long when the close comes, or one that outlives a cancel or duress of
the other button, sends nothing more. Held on to `duress_hold_s`, any press of the ended
incident still sends its duress alert, linked to it, showing nothing new.
"""


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        DOC.write_text(document())
        return 0
    sys.stdout.write(document())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
