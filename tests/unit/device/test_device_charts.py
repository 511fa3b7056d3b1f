"""The behaviour's tables and their drawing in docs/behaviour.md."""

from __future__ import annotations

from device.behaviour import GESTURES, Gesture, Mark, Phase
from device.charts import DOC, document


def test_the_document_is_drawn_from_the_tables_as_they_are() -> None:
    assert DOC.read_text() == document(), (
        "docs/behaviour.md is out of date: run `python -m device.charts --write`"
    )


def test_every_mark_a_button_can_send_in_each_phase_has_a_row() -> None:
    # a hold only grows: once the cancel pattern shows, only cancel-length marks can follow
    reachable = {
        Phase.OPENING: set(Mark),
        Phase.DURING: set(Mark),
        Phase.LOOKS_CANCELLED: {Mark.HELD_CANCEL, Mark.RELEASED_CANCEL, Mark.HELD_DURESS},
    }
    for phase, marks in reachable.items():
        assert {m for p, m in GESTURES if p == phase} == marks, phase


def test_a_release_or_the_duress_length_always_ends_the_press() -> None:
    for (phase, mark), (target, _gesture) in GESTURES.items():
        if mark.value.startswith("released") or mark is Mark.HELD_DURESS:
            assert target is Phase.DONE, (phase, mark)
    # and the opening press is never read as a cancel or duress: it opened the incident
    assert {g for (p, _), (_, g) in GESTURES.items() if p is Phase.OPENING} == {
        Gesture.NOTHING,
        Gesture.URGENT,
    }
