"""Figures and verdicts from what a run observed: a lost alert always fails the run."""

from __future__ import annotations

import time
from pathlib import Path

from simulator.report import distribution, summarise
from simulator.run import Observed, Record
from simulator.scenario import Scenario, Thresholds, plan
from simulator.sink import Arrival, Sink


def test_distribution_uses_values_that_occurred() -> None:
    d = distribution([0.1 * n for n in range(1, 21)])
    assert d["count"] == 20 and d["p95"] == 1.9 and d["max"] == 2.0
    assert distribution([])["p95"] is None


def observed(tmp_path: Path, thresholds: Thresholds) -> Observed:
    scenario = Scenario(name="t", thresholds=thresholds)
    o = Observed(scenario, plan(scenario))
    o.sink = Sink("a-secret-of-enough-length", tmp_path / "centre.db")
    now = time.time()
    o.t0, o.end = now - 5, now
    device = o.plan.devices[0].id
    for n in range(3):
        o.records[f"msg-0000{n}"] = Record(
            f"msg-0000{n}", device, "alert", "press", now - 4, {"received": now - 3.9}
        )
    # two of three reached the centre; one of those twice
    o.sink.arrivals["msg-00000"] = Arrival(device, "alert", {}, now - 3.5, deliveries=2)
    o.sink.arrivals["msg-00001"] = Arrival(device, "alert", {}, now - 3.0)
    o.availability = {d.id: 1.0 for d in o.plan.devices}
    return o


def test_a_lost_alert_fails_the_run_and_is_named(tmp_path: Path) -> None:
    summary = summarise(observed(tmp_path, Thresholds()))
    a = summary["alerts"]
    assert (a["sent"], a["delivered_at_centre"], a["lost"]) == (3, 2, 1)
    assert a["lost_ids"] == ["msg-00002"] and a["duplicate_deliveries"] == 1
    assert not summary["passed"]
    assert "1 alerts never reached the centre" in summary["failures"][0]
    assert summary["latency_s"]["press_to_delivered"]["max"] == 1.0
    assert summary["districts"]["mapo"]["lost"] == 1


def test_thresholds_fail_with_the_figure_and_the_limit(tmp_path: Path) -> None:
    summary = summarise(
        observed(tmp_path, Thresholds(max_lost=1, delivered_max_s=0.5, max_duplicates=0))
    )
    assert summary["failures"] == [
        "press to delivered max 1.000 s is over the threshold 0.5 s",
        "1 duplicate deliveries (max 0)",
    ]


def test_a_gateway_that_died_by_itself_or_a_dead_worker_fails_the_run(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    o.gateway_exit, o.workers_failed = 1, 1
    failures = summarise(o)["failures"]
    assert "the gateway exited by itself (code 1): see state/gateway.log" in failures
    assert "1 worker processes died: see state/worker-*.log" in failures


def test_sms_and_dead_link_figures_are_measured_from_the_press(tmp_path: Path) -> None:
    o = observed(
        tmp_path, Thresholds(max_lost=1, press_to_sms_p95_s=15, press_to_link_dead_p95_s=6)
    )
    sent_at = o.records["msg-00000"].sent_at
    o.sms = {"msg-00000": sent_at + 16.0, "someone-elses": sent_at}  # only our alerts count
    o.sms_sent = 1
    device = o.plan.devices[0].id
    o.link_dead = [(device, 100.0, 104.5), (device, 200.0, None)]
    summary = summarise(o)
    assert summary["alerts"]["sms_sent"] == 1
    lat = summary["latency_s"]
    assert (lat["press_to_sms"]["count"], lat["press_to_sms"]["p95"]) == (1, 16.0)
    assert (lat["press_to_link_dead"]["count"], lat["press_to_link_dead"]["max"]) == (1, 4.5)
    assert summary["dead_links_not_found"] == 1
    assert summary["failures"] == [
        "press to SMS p95 16.000 s is over the threshold 15 s",
        "1 presses on a black-holed link never found it dead",
    ]


def test_sms_and_dead_link_thresholds_fail_when_nothing_was_measured(tmp_path: Path) -> None:
    o = observed(
        tmp_path, Thresholds(max_lost=1, press_to_sms_p95_s=15, press_to_link_dead_p95_s=6)
    )
    assert summarise(o)["failures"] == [
        "no SMS was sent: the press-to-SMS threshold measured nothing",
        "no press landed on a black-holed link: nothing measured",
    ]


def test_a_device_offline_before_a_cut_is_not_detected_by_a_later_cut(tmp_path: Path) -> None:
    """A device a lossy link reset just before the first cut, back only after it, and cut
    again later: its `offline` in the second cut is that cut's detection, not a 6 s one
    of the first (what made a simulator CI test flaky)."""
    o = observed(tmp_path, Thresholds())
    assert o.sink is not None
    first, second = o.t0 + 2.0, o.t0 + 8.0
    o.partitions = [(first, first + 5, ["dev-a", "dev-b"]), (second, second + 3, ["dev-a"])]
    o.sink.statuses = [
        ("dev-a", "offline", first - 0.02),
        ("dev-b", "offline", first + 1.5),
        ("dev-a", "online", first + 5.1),
        ("dev-a", "offline", second + 0.01),
    ]
    summary = summarise(o)
    assert summary["offline_detected"] == "2/3"
    assert summary["offline_detection_s"]["max"] == 1.5
