"""The demo's tour: which bells it keeps pressing afterwards (ansimi_edge/demo.py)."""

from __future__ import annotations

from typing import Any, cast

from ansimi_edge.demo import TOUR, DemoBell, plan_tour, pressed_after_tour


def bells(*kinds: str) -> list[DemoBell]:
    # the tour reads only a bell's kind: no agent, buttons or light needed
    nothing = cast(Any, None)
    return [DemoBell(nothing, cast(Any, kind), nothing, nothing) for kind in kinds]


def test_after_the_tour_the_tamper_power_offline_and_test_bells_are_left_as_shown() -> None:
    # a press there would turn their cards into emergencies: those kinds would leave the desk
    fleet = bells(*(["bell", "store", "doorbell"] * 3), "bell")
    tour = plan_tour(fleet)
    assert len(tour) == len(TOUR)
    pressed = pressed_after_tour(fleet, tour)
    left_alone = [step.act.__name__ for step, bell in tour if not any(bell is p for p in pressed)]
    assert left_alone == ["_tamper", "_power_loss", "_go_offline", "_test_press"]
    assert len(pressed) == len(fleet) - 4 and pressed[-1] is fleet[-1]  # beyond the tour too
