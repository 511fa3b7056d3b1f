"""Figures and verdicts from what a run observed: a lost alert always fails the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from console.receiver import ReceivedEvent
from simulator.messages import LinkDeadSeen, Performed, VideoSeen
from simulator.report import distribution, summarise, write
from simulator.run import Observed, Record
from simulator.scenario import Plan, Scenario, Step, Thresholds, plan
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
    # the run ends after the tests' reports, which arrive "now"
    o.t0, o.end = now - 5, now + 60
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
    o.link_dead = [LinkDeadSeen(device, 100.0, 104.5), LinkDeadSeen(device, 200.0, None)]
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


def status(sink: Sink, device: str, body: dict[str, object], n: int) -> None:
    """A status event arriving at the centre now, as the console's receiver hands it on."""
    sink._arrived(ReceivedEvent(f"status-{n:04d}", device, "mapo", "status", 0, body, "jws", 0))


def test_a_second_offline_report_in_one_outage_is_flapping_and_fails(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    first, second = o.plan.devices[0].id, o.plan.devices[1].id
    now = time.time()
    o.partitions.append((now - 60, now - 1, [first, second]))
    status(o.sink, first, {"state": "offline"}, 1)
    status(o.sink, second, {"state": "offline"}, 2)
    status(o.sink, first, {"state": "online"}, 3)
    summary = summarise(o)
    assert summary["offline_per_outage"]["max_reports_in_one_outage"] == 1
    assert summary["passed"]
    status(o.sink, first, {"state": "offline"}, 4)  # just after it was back
    summary = summarise(o)
    assert summary["offline_per_outage"]["flapping_ids"] == [first]
    assert not summary["passed"]
    assert "1 devices reported offline more than 1 times in one outage" in summary["failures"][0]


def test_an_offline_report_about_a_device_without_an_outage_fails(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    status(o.sink, o.plan.devices[2].id, {"state": "offline"}, 1)
    summary = summarise(o)
    assert summary["offline_per_outage"]["false_ids"] == [o.plan.devices[2].id]
    assert any(
        "1 offline reports about devices that had no outage" in f for f in summary["failures"]
    )


def test_a_district_outage_counts_once_per_listed_device_however_often_updated(
    tmp_path: Path,
) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    ids = [d.id for d in o.plan.devices[:4]]
    o.partitions.append((time.time() - 30, time.time(), ids))
    outage = {"state": "district_outage", "district": "mapo", "count": 3, "offline": ids[:3]}
    status(o.sink, ids[0], outage, 1)
    status(o.sink, ids[0], outage | {"count": 4, "offline": ids}, 2)  # it grew
    summary = summarise(o)
    assert summary["centre"]["offline_reports"] == 4
    assert summary["offline_per_outage"]["outages_reported"] == 4
    assert summary["passed"], summary["failures"]
    assert [e["state"] for e in summary["centre"]["district_events"]] == ["district_outage"] * 2


def test_an_alert_in_an_outbox_the_simulator_destroyed_is_not_counted_lost(
    tmp_path: Path,
) -> None:
    o = observed(tmp_path, Thresholds())
    o.at_risk.add("msg-00002")  # the one that never reached the centre
    summary = summarise(o)
    assert summary["alerts"]["lost"] == 0
    assert summary["alerts"]["lost_with_a_destroyed_outbox"] == 1
    assert summary["passed"], summary["failures"]


def test_a_press_after_which_the_device_sent_nothing_fails_the_run(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    device = o.plan.devices[0].id
    sent_at = o.records["msg-00000"].sent_at
    o.performed = [Performed(device, "press", sent_at - 0.001)]  # its alert left right after
    assert summarise(o)["passed"]
    o.performed.append(Performed(device, "press", sent_at + 1))  # swallowed: nothing left after it
    summary = summarise(o)
    assert summary["alerts"]["actions_never_sent"] == 1
    assert (
        "1 presses (or other actions) never made their device send anything"
        in (summary["failures"][-1])
    )


def test_a_device_with_its_own_card_listed_in_an_outage_counts_once(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    ids = [d.id for d in o.plan.devices[:3]]
    o.partitions.append((time.time() - 30, time.time(), ids))
    status(o.sink, ids[0], {"state": "offline"}, 1)  # its own card, before the outage
    outage = {"state": "district_outage", "district": "mapo", "count": 3, "offline": ids}
    status(o.sink, ids[0], outage, 2)
    summary = summarise(o)
    assert summary["centre"]["offline_reports"] == 3
    assert summary["offline_per_outage"]["max_reports_in_one_outage"] == 1


def test_a_report_in_a_second_outage_belongs_to_it_not_to_the_first(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    device = o.plan.devices[0].id
    now = time.time()
    o.partitions += [(now - 20, now - 15, [device]), (now - 12, now - 5, [device])]
    status(o.sink, device, {"state": "offline"}, 1)  # both within the first's allowance
    status(o.sink, device, {"state": "offline"}, 2)
    o.sink.statuses[0] = (device, "offline", now - 17)
    summary = summarise(o)
    assert summary["offline_per_outage"]["outages_reported"] == 2
    assert summary["passed"], summary["failures"]


def test_a_reset_the_device_recovered_from_within_the_grace_is_no_outage(
    tmp_path: Path,
) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    short, long = o.plan.devices[0].id, o.plan.devices[1].id
    grace = o.scenario.gateway.will_grace(o.scenario.device.heartbeat_s)
    now = time.time()
    o.gaps += [(now - 10, now - 9.5, [short]), (now - 10, now - 10 + grace + 1, [long])]
    status(o.sink, short, {"state": "offline"}, 1)
    status(o.sink, long, {"state": "offline"}, 2)
    o.sink.statuses[:] = [(d, s, now - 9) for d, s, _ in o.sink.statuses]
    flaps = summarise(o)["offline_per_outage"]
    assert flaps["false_ids"] == [short]
    assert flaps["outages_reported"] == 1


def test_a_report_that_reached_the_centre_late_is_its_own_outages_not_flapping(
    tmp_path: Path,
) -> None:
    """Stopped twice 4 s apart: the first report, forwarded late, arrives after the second
    stop began; one report per outage all the same. A third there is flapping."""
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    device = o.plan.devices[0].id
    now = time.time()
    o.stops += [(now - 30, now - 29, [device]), (now - 26, now - 24, [device])]
    for n in range(2):
        status(o.sink, device, {"state": "offline"}, n)
    o.sink.statuses[:] = [(device, "offline", now - 25.5), (device, "offline", now - 22)]
    flaps = summarise(o)["offline_per_outage"]
    assert (flaps["outages_reported"], flaps["flapping_devices"]) == (2, 0)
    o.sink.statuses.append((device, "offline", now - 21))
    flaps = summarise(o)["offline_per_outage"]
    assert (flaps["outages_reported"], flaps["flapping_ids"]) == (2, [device])


def test_offline_reports_after_the_run_are_the_simulators_own_stop_not_false(
    tmp_path: Path,
) -> None:
    """Once the run is over the simulator stops every agent: a silence report then is true,
    while the same report during the run, in no outage, is false."""
    o = observed(tmp_path, Thresholds(max_lost=1))
    assert o.sink is not None
    during, after = o.plan.devices[0].id, o.plan.devices[1].id
    o.end = time.time() - 5
    status(o.sink, during, {"state": "offline"}, 1)
    status(o.sink, after, {"state": "offline"}, 2)
    o.sink.statuses[:] = [
        (during, "offline", o.end - 1),
        (after, "offline", o.end + 2),
    ]
    flaps = summarise(o)["offline_per_outage"]
    assert flaps["false_ids"] == [during]


# ---- the report for QA ---------------------------------------------------------------------


def report_html(tmp_path: Path, o: Observed) -> tuple[dict[str, Any], str]:
    summary = summarise(o)
    write(o, summary, tmp_path / "report")
    return summary, (tmp_path / "report" / "index.html").read_text()


def test_every_figure_stands_beside_its_threshold_also_when_the_run_passes(
    tmp_path: Path,
) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1, delivered_max_s=5, received_p95_s=1))
    summary, page = report_html(tmp_path, o)
    assert summary["passed"]
    rows = {c["figure"]: c for c in summary["checks"]}
    assert rows["press to delivered max"] | {"note": ""} == {
        "figure": "press to delivered max",
        "value": 1.0,
        "unit": "s",
        "threshold": 5,
        "limit": "at most",
        "ok": True,
        "note": "",
    }
    assert rows["alerts lost"]["value"] == 1 and rows["alerts lost"]["ok"] is True
    assert rows["press to acknowledged p95"]["threshold"] is None  # shown, none set
    assert rows["district mapo availability"]["limit"] == "at least"
    assert "<td>press to delivered max</td><td>1.0 s</td><td>at most 5 s</td><td>pass</td>" in page


def test_a_percentile_of_a_handful_of_samples_says_so(tmp_path: Path) -> None:
    summary, page = report_html(tmp_path, observed(tmp_path, Thresholds(received_p95_s=1)))
    (received,) = [c for c in summary["checks"] if c["figure"] == "press to received p95"]
    assert received["note"].startswith("only 3 samples")
    assert "p95/p99 of 3 samples" in page


def test_no_raw_dictionaries_or_lists_in_the_page(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    _, page = report_html(tmp_path, o)
    body = page.split("</style>", 1)[1]
    assert "{" not in body and "[" not in body, body
    # by_trigger, video and offline detection are tables of their own
    assert "<th>trigger</th><th>messages</th></tr><tr><td>press</td><td>3</td>" in body
    assert "<th>streams</th>" in body and "<th>partitioned devices reported offline</th>" in body


def test_planned_versus_sent_per_kind_gives_the_reason_for_a_difference(tmp_path: Path) -> None:
    o = observed(tmp_path, Thresholds(max_lost=1))
    device = o.plan.devices[0].id
    steps = [Step(1.0, device, "press"), Step(2.0, device, "press"), Step(3.0, device, "tamper")]
    o.plan = Plan(o.plan.devices, steps, {})
    first_sent = min(r.sent_at for r in o.records.values())
    # one press made the alerts; a tamper came after them and sent nothing; one press not done
    o.performed = [[device, "press", first_sent - 0.5], [device, "tamper", first_sent + 10]]
    summary, page = report_html(tmp_path, o)
    rows = {r["kind"]: r for r in summary["planned_vs_sent"]}
    assert (rows["press"]["planned"], rows["press"]["done"], rows["press"]["sent"]) == (2, 1, 1)
    assert rows["press"]["reason"].startswith("1 not done: its agent was stopped by a fault")
    assert (rows["tamper"]["done"], rows["tamper"]["sent"]) == (1, 0)
    assert "the device sent nothing after it" in rows["tamper"]["reason"]
    assert "<td>tamper</td><td>1</td><td>1</td><td>0</td>" in page


def test_a_doorbell_without_video_is_listed_with_the_reason(tmp_path: Path) -> None:
    scenario = Scenario(
        name="t", fleet={"count": 3, "mix": {"doorbell": 1.0}}, video={"enabled": True}
    )
    o = Observed(scenario, plan(scenario))
    o.sink = Sink("a-secret-of-enough-length", tmp_path / "centre.db")
    o.t0, o.end = 0.0, 10.0
    rang, pressed, quiet = (d.id for d in o.plan.devices)
    o.records["a-ring-000"] = Record("a-ring-000", rang, "alert", "doorbell_ring", 1.0)
    o.records["a-press-00"] = Record("a-press-00", pressed, "alert", "press", 1.0)
    o.video = [VideoSeen("session-1", pressed, 1.1, 1.3, 1.0)]
    summary, page = report_html(tmp_path, o)
    why = {d["device"]: d["why"] for d in summary["video"]["doorbells_without_video"]}
    assert why == {
        rang: "only rings: a ring offers no video, an emergency does",
        quiet: "it sent no alert",
    }
    assert "only rings: a ring offers no video" in page
