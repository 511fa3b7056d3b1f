"""The rollout scenario's verdict: what the gateway said of each release beside what the
bells ran at the end; every way the story can go wrong fails the run, by name."""

from __future__ import annotations

from typing import Any

from simulator.messages import Performed
from simulator.rollouts import (
    ReleaseSeen,
    StepSeen,
    expected_versions,
    rollout_failures,
    rollout_summary,
)
from simulator.scenario import Release, Rollout

BELLS = ("bell-1", "bell-2", "bell-3")
PLAN = Rollout(
    releases=[
        Release(version="2.0", steps=[50, 100]),
        Release(version="3.0", selftest_fails=True),
    ]
)
T0 = 1_000.0


def progress(state: str, reason: str | None = None) -> dict[str, Any]:
    return {"state": state, "at_ms": 0, "offers": 1, "reason": reason}


def as_told() -> list[ReleaseSeen]:
    """The story told right: 2.0 done on every bell in two steps, 3.0 paused with every
    bell rolled back."""
    good = ReleaseSeen("2.0", False, started_at=T0 + 5, ended_at=T0 + 20, state="done")
    good.steps = [
        StepSeen(50, T0 + 5, 4.0, "done", 2),
        StepSeen(100, T0 + 10, 9.0, "done", 3),
    ]
    good.devices = {d: progress("installed") for d in BELLS}
    broken = ReleaseSeen("3.0", True, started_at=T0 + 20, ended_at=T0 + 30, state="paused")
    broken.steps = [StepSeen(100, T0 + 20, 10.0, "paused", 3)]
    broken.devices = {
        d: progress("failed", "rolled_back: health check failed: the self-test failed")
        for d in BELLS
    }
    return [good, broken]


def judge(
    seen: list[ReleaseSeen],
    versions: dict[str, str] | None = None,
    *,
    updating: list[str] | None = None,
    pressed_at: tuple[float, ...] = (T0 + 8, T0 + 25),
) -> tuple[dict[str, Any], list[str]]:
    performed = [Performed("bell-1", "press", at) for at in pressed_at]
    summary = rollout_summary(
        PLAN,
        seen,
        versions if versions is not None else dict.fromkeys(BELLS, "2.0"),
        updating or [],
        9,
        performed,
        T0,
    )
    return summary, rollout_failures(summary, PLAN.releases)


def test_the_story_told_right_passes_with_its_figures() -> None:
    summary, failures = judge(as_told())
    assert failures == []
    good, broken = summary["releases"]
    assert [s["seconds"] for s in good["steps"]] == [4.0, 9.0]
    assert (good["presses_during"], broken["presses_during"]) == (1, 1)
    assert broken["rolled_back"] == 3 and summary["running_at_end"] == {"2.0": 3}


def test_a_broken_release_not_paused_or_not_rolled_back_fails() -> None:
    seen = as_told()
    seen[1].state = "done"
    seen[1].devices["bell-2"] = progress("installed")
    seen[1].devices["bell-3"] = progress("failed", "storage_failed: disk full")
    _, failures = judge(seen)
    assert "broken release 3.0: the rollout is done, not paused" in failures
    assert (
        "broken release 3.0: not rolled back: bell-2 (installed: None), "
        "bell-3 (failed: storage_failed: disk full)"
    ) in failures


def test_a_bell_offered_the_broken_release_that_never_answered_fails() -> None:
    seen = as_told()
    seen[1].devices["bell-3"] = progress("offered")
    _, failures = judge(seen)
    assert failures == ["broken release 3.0: offered and never answered: bell-3"]


def test_a_bell_left_on_the_broken_release_or_midway_fails() -> None:
    versions = {"bell-1": "2.0", "bell-2": "3.0", "bell-3": "2.0"}
    _, failures = judge(as_told(), versions, updating=["bell-3"])
    assert "bells left on a broken release: bell-2" in failures
    assert "1 bells not on the version their rollouts installed: bell-2 runs 3.0, not 2.0" in (
        failures
    )
    assert "bells with an update still under way at the end: bell-3" in failures


def test_a_good_release_paused_midway_fails_and_its_bells_stay_where_they_were() -> None:
    seen = as_told()[:1]
    seen[0].state = "paused"
    seen[0].paused_because = "1 devices failed (pauses at 1)"
    seen[0].steps = seen[0].steps[:1]
    seen[0].devices = {"bell-1": progress("installed"), "bell-2": progress("failed", "x: y")}
    versions = {"bell-1": "2.0", "bell-2": "1.0", "bell-3": "1.0"}
    assert expected_versions("1.0", seen, BELLS) == versions
    _, failures = judge(seen, versions)
    assert failures == [
        "release 2.0: the rollout is paused at 50% (should be done at 100%): "
        "1 devices failed (pauses at 1)",
        "release 2.0: not installed on bell-2",
        "release 3.0 was never rolled out",
    ]


def test_a_rollout_nobody_pressed_a_bell_during_fails() -> None:
    _, failures = judge(as_told(), pressed_at=(T0 + 1, T0 + 40))
    advice = "press more ([rollout] presses_per_step, events)"
    assert failures == [
        f"release 2.0: 0 presses during its rollout (at least 1): {advice}",
        f"release 3.0: 0 presses during its rollout (at least 1): {advice}",
    ]
