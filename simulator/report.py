"""Figures from a run, the pass/fail verdict, and the report: `summary.json` and `index.html`.

Latencies are measured from the moment a message first left its device (for the alert a
press opens, that is the press itself; a coalesced update leaves once the previous message
is `received`) to the moment the device saw each ack stage, and to the moment the centre
sink first accepted it. All on this machine's wall clock, whatever skew a device has.

Per district, in EN 50136 terms: the transmission time of each alert (device to centre)
as mean, 95th percentile and maximum, and availability as the share of the run each
device had a working path to the broker (connected, and not cut off by a partition it may
not have noticed yet), averaged over the district's devices. Class limits are left to
the scenario's thresholds, where QA sets them.

Plots need matplotlib (the `sim` extra); without it the HTML page has the tables only.
"""

from __future__ import annotations

import bisect
import html
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from simulator.rollouts import rollout_failures, rollout_summary
from simulator.run import Observed


def distribution(values: Iterable[float]) -> dict[str, float | int | None]:
    data = sorted(values)
    if not data:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None, "max": None}

    def pct(p: float) -> float:
        # nearest rank: a value that really occurred
        return data[max(0, math.ceil(p * len(data)) - 1)]

    return {
        "count": len(data),
        "mean": round(statistics.fmean(data), 4),
        "p50": round(pct(0.50), 4),
        "p95": round(pct(0.95), 4),
        "p99": round(pct(0.99), 4),
        "max": round(data[-1], 4),
    }


def summarise(o: Observed) -> dict[str, Any]:
    s = o.scenario
    assert o.sink is not None
    arrivals = o.sink.arrivals
    records = list(o.records.values())
    devices = {d.id: d for d in o.plan.devices}
    # an alert waiting in an outbox the simulator destroyed is the fault's, not a loss
    lost = [r for r in records if r.id not in arrivals and r.id not in o.at_risk]
    lost_to_damage = sum(1 for r in records if r.id in o.at_risk and r.id not in arrivals)
    extra = sum(arrivals[r.id].deliveries - 1 for r in records if r.id in arrivals)
    dup_events = sum(1 for r in records if r.id in arrivals and arrivals[r.id].deliveries > 1)
    by_type: dict[str, int] = defaultdict(int)
    for r in records:
        by_type[r.trigger] += 1

    def stage(name: str) -> list[float]:
        return [r.acks[name] - r.sent_at for r in records if name in r.acks]

    delivered = {r.id: arrivals[r.id].at - r.sent_at for r in records if r.id in arrivals}
    offline = _offline_detection(o)
    per_outage = _offline_per_outage(o)
    unheard = _unheard(o)
    districts: dict[str, Any] = {}
    per_district: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.id in delivered:
            per_district[devices[r.device].district].append(delivered[r.id])
    members: dict[str, list[str]] = defaultdict(list)
    for d in o.plan.devices:
        members[d.district].append(d.id)
    for district in sorted(members):
        times = distribution(per_district.get(district, []))
        ids = members[district]
        avail = [o.availability.get(i, 0.0) for i in ids]
        districts[district] = {
            "devices": len(ids),
            "alerts": times["count"],
            "transmission_mean_s": times["mean"],
            "transmission_p95_s": times["p95"],
            "transmission_max_s": times["max"],
            "lost": sum(1 for r in lost if devices[r.device].district == district),
            "availability": round(statistics.fmean(avail), 5) if avail else None,
        }
    summary: dict[str, Any] = {
        "scenario": s.name,
        "description": s.description,
        "seed": s.seed,
        "devices": len(o.plan.devices),
        "mix": _count(d.kind for d in o.plan.devices),
        "duration_s": s.scaled(s.duration_s),
        "time_scale": s.time_scale,
        "wall_s": round(o.end - o.t0, 2),
        "actions": o.actions,
        "alerts": {
            "sent": len(records),
            "by_trigger": dict(sorted(by_type.items())),
            "received_on_device": sum(1 for r in records if "received" in r.acks),
            "delivered_at_centre": len(delivered),
            "delivered_ack_on_device": sum(1 for r in records if "delivered" in r.acks),
            "acknowledged_on_device": sum(1 for r in records if "acknowledged" in r.acks),
            "lost": len(lost),
            "lost_ids": [r.id for r in lost[:20]],
            "lost_with_a_destroyed_outbox": lost_to_damage,
            # a press (or any action) after which its device sent nothing at all
            "actions_never_sent": len(unheard),
            "actions_never_sent_examples": unheard[:10],
            "duplicate_deliveries": extra,
            "events_delivered_twice_or_more": dup_events,
            "resends": o.resends,
            "left_in_device_outboxes": sum(o.outbox_left.values()),
            "sms_sent": o.sms_sent,
        },
        "latency_s": {
            "press_to_received": distribution(stage("received")),
            "press_to_delivered": distribution(delivered.values()),
            "press_to_delivered_ack": distribution(stage("delivered")),
            "press_to_acknowledged": distribution(stage("acknowledged")),
            "press_to_sms": distribution(o.sms[r.id] - r.sent_at for r in records if r.id in o.sms),
            "press_to_link_dead": distribution(
                dead - pressed for _, pressed, dead in o.link_dead if dead is not None
            ),
        },
        # presses on a black-holed link whose agent never found it dead before it healed
        "dead_links_not_found": sum(1 for _, _, dead in o.link_dead if dead is None),
        "reconnect_after_broker_restart_s": [round(x, 3) for x in o.reconnect_s],
        "offline_detection_s": distribution(offline.values()),
        "offline_detected": f"{len(offline)}/{sum(len(p[2]) for p in o.partitions)}",
        "districts": districts,
        "video": _video(o),
        "heartbeats_sent": o.heartbeats,
        "centre": {
            "answered_503": o.sink.answered_503,
            "refused": o.sink.receiver.refused,
            "status_events": len(o.sink.statuses),
            "offline_reports": sum(1 for _, state, _ in o.sink.statuses if state == "offline"),
            "district_events": [
                {"district": d, "state": state, "listed": n, "at_s": round(at - o.t0, 3)}
                for d, state, n, at in o.sink.district_events
            ],
        },
        "offline_per_outage": per_outage,
        "agent_errors": o.agent_errors,
        "gateway_exit_code": o.gateway_exit,
        "workers_failed": o.workers_failed,
        "agents_never_ready": o.not_ready,
        "downlink_rejected": o.rejected_downlink,
        "clock_skewed_devices": len(o.skewed),
        "links_reset_by_loss": o.links_lost,
        "faults": [
            {
                "at_s": round(m.at - o.t0, 3),
                "label": m.label,
                "until_s": None if m.until is None else round(m.until - o.t0, 3),
            }
            for m in o.marks
        ],
        "todo": s.todo,
    }
    summary["planned_vs_sent"] = _planned_vs_sent(o, unheard)
    if s.rollout is not None:
        summary["rollout"] = rollout_summary(
            s.rollout, o.rollouts, o.versions, o.updating_left, o.restarts, o.performed, o.t0
        )
    summary["video"]["doorbells_without_video"] = _no_video(o)
    summary["checks"] = checks(summary, s)
    failures = verdict(summary, s)
    summary["failures"] = failures
    summary["passed"] = not failures
    return summary


# a percentile of fewer samples than this is a few values' maximum, not a percentile
FEW_SAMPLES = 20


def checks(summary: dict[str, Any], s: Any) -> list[dict[str, Any]]:
    """Every figure the verdict judges, beside its threshold, passing or not (QA reads
    the margin, not only the verdict); `threshold` None: the scenario sets none."""
    t = s.thresholds
    a = summary["alerts"]
    lat = summary["latency_s"]
    video = summary["video"]
    flaps = summary["offline_per_outage"]
    rows: list[dict[str, Any]] = []

    def row(
        figure: str,
        value: float | None,
        threshold: float | None,
        *,
        unit: str = "",
        samples: int | None = None,
        at_least: bool = False,
    ) -> None:
        ok = None
        if threshold is not None and value is not None:
            ok = value >= threshold if at_least else value <= threshold
        note = ""
        if samples is not None and 0 < samples < FEW_SAMPLES:
            note = f"only {samples} samples: this is about the worst of them, not a percentile"
        elif samples == 0:
            note = "nothing measured"
        rows.append(
            {
                "figure": figure,
                "value": value,
                "unit": unit,
                "threshold": threshold,
                "limit": "at least" if at_least else "at most",
                "ok": ok,
                "note": note,
            }
        )

    row("alerts lost", a["lost"], t.max_lost)
    row("actions after which the device sent nothing", a["actions_never_sent"], 0)
    for name, key, limit in (
        ("press to received p95", "press_to_received", t.received_p95_s),
        ("press to delivered p95", "press_to_delivered", t.delivered_p95_s),
        ("press to acknowledged p95", "press_to_acknowledged", t.acknowledged_p95_s),
        ("press to SMS p95", "press_to_sms", t.press_to_sms_p95_s),
        ("press to link dead p95", "press_to_link_dead", t.press_to_link_dead_p95_s),
    ):
        row(name, lat[key]["p95"], limit, unit="s", samples=lat[key]["count"])
    delivered = lat["press_to_delivered"]
    row("press to delivered max", delivered["max"], t.delivered_max_s, unit="s")
    alert_video = video["alert_to_connected_s"]
    row(
        "alert to video p95",
        alert_video["p95"],
        t.video_p95_s,
        unit="s",
        samples=alert_video["count"],
    )
    offline = summary["offline_detection_s"]
    row(
        "offline detection p95",
        offline["p95"],
        t.offline_detect_p95_s,
        unit="s",
        samples=offline["count"],
    )
    for n, seconds in enumerate(summary["reconnect_after_broker_restart_s"], start=1):
        row(f"reconnect after broker restart {n}", seconds, t.reconnect_s, unit="s")
    row("duplicate deliveries", a["duplicate_deliveries"], t.max_duplicates)
    row(
        "offline reports in one outage",
        flaps["max_reports_in_one_outage"],
        t.max_offline_per_outage,
    )
    row("offline reports without an outage", flaps["false_reports"], t.max_false_offline)
    row("offline reports", summary["centre"]["offline_reports"], t.max_offline_reports)
    for name, d in summary["districts"].items():
        row(f"district {name} availability", d["availability"], t.min_availability, at_least=True)
    return rows


PLAN_REASONS = {
    "not_done": "not done: its agent was stopped by a fault then (nobody presses a stopped "
    "bell), or its worker died (see the failures)",
    "silent": "done, but the device sent nothing after it: a failure",
}


def _planned_vs_sent(o: Observed, unheard: list[list[Any]]) -> list[dict[str, Any]]:
    """Per kind of action: planned, done, and done with a message sent; why they differ.
    Presses during an incident are coalesced into one update (device/behaviour.py), so a
    kind's alerts (by_trigger) may be fewer than its presses: that is by design."""
    planned = _count(step.action for step in o.plan.steps)
    done = _count(action for _, action, _ in o.performed)
    silent = _count(action for _, action, _ in unheard)
    rows = []
    for kind in sorted(planned.keys() | done.keys()):
        p, d, q = planned.get(kind, 0), done.get(kind, 0), silent.get(kind, 0)
        reasons = []
        if d < p:
            reasons.append(f"{p - d} {PLAN_REASONS['not_done']}")
        if q:
            reasons.append(f"{q} {PLAN_REASONS['silent']}")
        rows.append(
            {"kind": kind, "planned": p, "done": d, "sent": d - q, "reason": "; ".join(reasons)}
        )
    return rows


def _no_video(o: Observed) -> list[dict[str, str]]:
    """Each doorbell that offered no video, and why."""
    from simulator.worker import EMERGENCY_TRIGGERS

    offered = {v[1] for v in o.video}
    triggers: dict[str, list[str]] = defaultdict(list)
    for r in o.records.values():
        triggers[r.device].append(r.trigger)
    out = []
    for d in o.plan.devices:
        if d.kind != "doorbell" or d.id in offered:
            continue
        mine = triggers.get(d.id, [])
        if not o.scenario.video.enabled:
            why = "video is off in this scenario ([video] enabled = false)"
        elif not mine:
            why = "it sent no alert"
        elif not any(t in EMERGENCY_TRIGGERS for t in mine):
            why = "only rings: a ring offers no video, an emergency does"
        elif d.id in {dev for _, _, devs in o.stops for dev in devs}:
            why = "its agent was stopped by a fault"
        else:
            why = "an emergency was sent but no stream was offered: see state/worker-*.log"
        out.append({"device": d.id, "alerts": ", ".join(mine) or "none", "why": why})
    return out


def _video(o: Observed) -> dict[str, Any]:
    """Doorbell streams: offered, connected, and from the emergency to a connected stream."""
    connected = [(v, v.connected_at) for v in o.video if v.connected_at is not None]
    v = o.scenario.video
    return {
        "link": f"{v.link_loss:.0%} loss, {v.link_delay_ms} ms delay on the doorbells' side",
        "datagrams_through_link": o.video_datagrams,
        "datagrams_dropped": o.video_dropped,
        "offered": len(o.video),
        "connected": len(connected),
        "offer_to_connected_s": distribution(at - v.offered_at for v, at in connected),
        "alert_to_connected_s": distribution(
            at - v.emergency_at for v, at in connected if v.emergency_at
        ),
    }


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[item] += 1
    return dict(out)


def _offline_detection(o: Observed) -> dict[str, float]:
    """Per partitioned device: from the cut to the centre hearing `offline` about it."""
    assert o.sink is not None
    found: dict[str, float] = {}
    for start, end, targets in o.partitions:
        # A device already reported offline when the cut began (a lossy link reset it just
        # before) leaves this cut nothing to detect; its next `offline` belongs to a later one.
        last_before = {
            d: state for d, state, at in sorted(o.sink.statuses, key=lambda x: x[2]) if at < start
        }
        wanted = {d for d in targets if last_before.get(d) != "offline"}
        for device, state, at in o.sink.statuses:
            if state == "offline" and device in wanted and start <= at and device not in found:
                found[device] = at - start
        del end  # a detection after healing still counts: it measures the gateway's delay
    return found


def _unheard(o: Observed) -> list[list[Any]]:
    """Actions after which their device sent no alert or cancel at all (a swallowed press:
    never sent, so never a record that could be counted lost)."""
    sent: dict[str, list[float]] = defaultdict(list)
    for r in o.records.values():
        sent[r.device].append(r.sent_at)
    for times in sent.values():
        times.sort()
    out = []
    for device, action, at in o.performed:
        times = sent.get(device, [])
        # the press's own alert leaves after the press; a coalesced update later still
        if bisect.bisect_left(times, at - CLOCK_SLACK_S) == len(times):
            out.append([device, action, round(at - o.t0, 3)])
    return out


# the worker stamps an action and the message it causes on one clock; this covers rounding
CLOCK_SLACK_S = 0.01
# A link the device sees up again is not yet heard: it subscribes, then sends its online
# (a round trip or two, more on a slow link), and the link is sampled four times a second.
# So a gap this much shorter than the grace may still outlast it at the gateway; with a
# grace under ~2 s (a one-second heartbeat) a flap and a slow reconnect look alike.
RECONNECT_SLACK_S = 1.0
# a report of a link that went down comes at once (the will, after the grace): the tick
# and forwarding after the link is back
GAP_ALLOWANCE_S = 3.0


def _offline_per_outage(o: Observed) -> dict[str, Any]:
    """Offline reports at the centre, per device and per outage the simulator caused.

    A device's outages are the partitions it was in, the times its agent was stopped (a
    report may follow their end by the silence timeout, the tick and forwarding) and the
    times its own link was down for at least the gateway's will grace (reported at once
    by its last will). A report belongs to the earliest outage around it that has none
    yet; a second one where all have one is flapping. A report in no outage is false: the
    gateway reported a device that was there all along, or one back within the grace (a
    reset it recovered from).
    """
    assert o.sink is not None
    s = o.scenario
    silence = s.device.heartbeat_s * s.gateway.missed
    grace = s.gateway.will_grace(s.device.heartbeat_s)
    windows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    long_gaps = [
        (start, end + GAP_ALLOWANCE_S, devices)
        for start, end, devices in o.gaps
        if end - start + RECONNECT_SLACK_S >= grace
    ]
    cut = [
        (start, end + silence + 10.0, devices) for start, end, devices in [*o.partitions, *o.stops]
    ]
    for start, end, devices in sorted([*cut, *long_gaps]):
        for device in devices:
            windows[device].append((start, end))
    counts: dict[tuple[str, int], int] = defaultdict(int)
    false: list[str] = []
    for device, state, at in sorted(o.sink.statuses, key=lambda s: s[2]):
        if state != "offline" or at >= o.end > 0:
            # once the run is over the simulator stops every agent itself: those are true
            continue
        # The earliest outage around it not yet reported, else the latest around it (a
        # second report there is flapping). Not simply the latest: a report the centre got
        # late (forwarding backs off under load) may arrive once the next outage has begun.
        mine = windows.get(device, [])
        around = [n for n, (start, end) in enumerate(mine) if start <= at <= end]
        if not around:
            false.append(device)
            continue
        n = next((n for n in around if (device, n) not in counts), around[-1])
        counts[(device, n)] += 1
    flapping = sorted({d for (d, _), c in counts.items() if c > 1})
    return {
        "outages_reported": len(counts),
        "max_reports_in_one_outage": max(counts.values(), default=0),
        "flapping_devices": len(flapping),
        "flapping_ids": flapping[:20],
        "false_reports": len(false),
        "false_ids": sorted(set(false))[:20],
    }


def verdict(summary: dict[str, Any], s: Any) -> list[str]:
    t = s.thresholds
    fails: list[str] = []
    a = summary["alerts"]
    lat = summary["latency_s"]
    if a["lost"] > t.max_lost:
        fails.append(f"{a['lost']} alerts never reached the centre (allowed {t.max_lost})")
    if a["actions_never_sent"]:
        fails.append(
            f"{a['actions_never_sent']} presses (or other actions) never made their device "
            f"send anything, e.g. {a['actions_never_sent_examples'][:3]}"
        )
    if summary["agent_errors"]:
        fails.append(f"{summary['agent_errors']} agents stopped with an error")
    if summary["gateway_exit_code"] is not None:
        fails.append(
            f"the gateway exited by itself (code {summary['gateway_exit_code']}): "
            "see state/gateway.log"
        )
    if summary["agents_never_ready"]:
        fails.append(f"{summary['agents_never_ready']} agents never became ready")
    if summary["workers_failed"]:
        fails.append(f"{summary['workers_failed']} worker processes died: see state/worker-*.log")

    def over(name: str, value: float | None, limit: float | None) -> None:
        if limit is not None and value is not None and value > limit:
            fails.append(f"{name} {value:.3f} s is over the threshold {limit:g} s")

    over("press to received p95", lat["press_to_received"]["p95"], t.received_p95_s)
    over("press to delivered p95", lat["press_to_delivered"]["p95"], t.delivered_p95_s)
    over("press to delivered max", lat["press_to_delivered"]["max"], t.delivered_max_s)
    over("press to acknowledged p95", lat["press_to_acknowledged"]["p95"], t.acknowledged_p95_s)
    over("alert to video p95", summary["video"]["alert_to_connected_s"]["p95"], t.video_p95_s)
    over("press to SMS p95", lat["press_to_sms"]["p95"], t.press_to_sms_p95_s)
    if t.press_to_sms_p95_s is not None and not lat["press_to_sms"]["count"]:
        fails.append("no SMS was sent: the press-to-SMS threshold measured nothing")
    over("press to link dead p95", lat["press_to_link_dead"]["p95"], t.press_to_link_dead_p95_s)
    if t.press_to_link_dead_p95_s is not None:
        missed = summary["dead_links_not_found"]
        if missed:
            fails.append(f"{missed} presses on a black-holed link never found it dead")
        elif not lat["press_to_link_dead"]["count"]:
            fails.append("no press landed on a black-holed link: nothing measured")
    if t.video_p95_s is not None and summary["video"]["connected"] < summary["video"]["offered"]:
        v = summary["video"]
        fails.append(
            f"{v['offered'] - v['connected']} of {v['offered']} video streams never connected"
        )
    over("offline detection p95", summary["offline_detection_s"]["p95"], t.offline_detect_p95_s)
    if t.reconnect_s is not None:
        for x in summary["reconnect_after_broker_restart_s"]:
            over("reconnect after broker restart", x, t.reconnect_s)
        restarts = sum(1 for f in s.faults if f.type == "broker_restart")
        if len(summary["reconnect_after_broker_restart_s"]) < restarts:
            fails.append("not every device reconnected after a broker restart")
    if t.max_duplicates is not None and a["duplicate_deliveries"] > t.max_duplicates:
        fails.append(f"{a['duplicate_deliveries']} duplicate deliveries (max {t.max_duplicates})")
    if t.acknowledged_p95_s is not None and s.operator.ack_after_s is not None:
        missing = a["delivered_at_centre"] - a["acknowledged_on_device"]
        alerts = sum(n for k, n in a["by_trigger"].items() if k != "cancel")
        if a["acknowledged_on_device"] < alerts:
            fails.append(f"{missing} alerts never showed `acknowledged` on their device")
    flaps = summary["offline_per_outage"]
    if flaps["max_reports_in_one_outage"] > t.max_offline_per_outage:
        fails.append(
            f"{flaps['flapping_devices']} devices reported offline more than "
            f"{t.max_offline_per_outage} times in one outage (flapping), "
            f"e.g. {', '.join(flaps['flapping_ids'][:5])}"
        )
    if flaps["false_reports"] > t.max_false_offline:
        fails.append(
            f"{flaps['false_reports']} offline reports about devices that had no outage "
            f"(max {t.max_false_offline}), e.g. {', '.join(flaps['false_ids'][:5])}"
        )
    offline = summary["centre"]["offline_reports"]
    if t.max_offline_reports is not None and offline > t.max_offline_reports:
        fails.append(f"{offline} devices reported offline (max {t.max_offline_reports})")
    if t.min_availability is not None:
        for name, d in summary["districts"].items():
            if d["availability"] is not None and d["availability"] < t.min_availability:
                fails.append(
                    f"district {name}: availability {d['availability']:.4f} "
                    f"under {t.min_availability:g}"
                )
    if s.rollout is not None:
        fails += rollout_failures(summary["rollout"], s.rollout.releases)
    return fails


# ---- writing ---------------------------------------------------------------------------------


def write(o: Observed, summary: dict[str, Any], report_dir: Path) -> list[Path]:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = _plots(o, report_dir)
    (report_dir / "index.html").write_text(_html(summary, plots))
    return [report_dir / "summary.json", report_dir / "index.html", *plots]


def _plots(o: Observed, report_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    assert o.sink is not None
    made: list[Path] = []
    records = list(o.records.values())
    series = {
        "received (device)": [
            r.acks["received"] - r.sent_at for r in records if "received" in r.acks
        ],
        "at the centre": [
            o.sink.arrivals[r.id].at - r.sent_at for r in records if r.id in o.sink.arrivals
        ],
        "acknowledged (device)": [
            r.acks["acknowledged"] - r.sent_at for r in records if "acknowledged" in r.acks
        ],
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, values in series.items():
        if values:
            data = sorted(values)
            ax.plot(data, [(i + 1) / len(data) for i in range(len(data))], label=label)
    ax.set_xlabel("seconds from leaving the device")
    ax.set_ylabel("share of alerts")
    ax.set_title("Latency (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend()
    made.append(_save(fig, report_dir / "latency.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4))
    sent = sorted(r.sent_at - o.t0 for r in records)
    got = sorted(o.sink.arrivals[r.id].at - o.t0 for r in records if r.id in o.sink.arrivals)
    if sent:
        ax.step(sent, range(1, len(sent) + 1), where="post", label="sent by devices")
    if got:
        ax.step(got, range(1, len(got) + 1), where="post", label="at the centre")
    ax2 = ax.twinx()
    ax2.plot(
        [t - o.t0 for t, _ in o.connected],
        [n for _, n in o.connected],
        color="grey",
        alpha=0.5,
        label="devices connected",
    )
    ax2.set_ylabel("devices connected (as each device sees it)")
    ax2.set_ylim(0, max(len(o.plan.devices), 1) * 1.05)
    for m in o.marks:
        end = (m.until or m.at) - o.t0
        ax.axvspan(m.at - o.t0, max(end, m.at - o.t0 + 0.1), color="red", alpha=0.15)
        ax.text(m.at - o.t0, 0, m.label, rotation=90, va="bottom", fontsize=7)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("alerts (cumulative)")
    ax.set_title("Timeline, faults shaded")
    ax.legend(loc="upper left")
    made.append(_save(fig, report_dir / "timeline.png", plt))

    summary_districts = summarise_districts(o)
    if summary_districts:
        fig, ax = plt.subplots(figsize=(8, 4))
        names = list(summary_districts)
        ax.bar(names, [summary_districts[n][0] for n in names], label="mean")
        ax.plot(names, [summary_districts[n][1] for n in names], "kv", label="95th percentile")
        ax.set_ylabel("transmission time, s")
        ax.set_title("Per district")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        made.append(_save(fig, report_dir / "districts.png", plt))
    return made


def summarise_districts(o: Observed) -> dict[str, tuple[float, float]]:
    assert o.sink is not None
    devices = {d.id: d.district for d in o.plan.devices}
    per: dict[str, list[float]] = defaultdict(list)
    for r in o.records.values():
        if r.id in o.sink.arrivals:
            per[devices[r.device]].append(o.sink.arrivals[r.id].at - r.sent_at)
    out = {}
    for name, values in sorted(per.items()):
        d = distribution(values)
        out[name] = (float(d["mean"] or 0), float(d["p95"] or 0))
    return out


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cell(value: Any) -> str:
    """A value as table text: a list as its items, never a raw dict or list."""
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    return str(value)


def _table(headers: list[str], rows: Iterable[Iterable[Any]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


DISTRIBUTION = ("count", "mean", "p50", "p95", "p99", "max")


def _few(d: dict[str, Any]) -> str:
    n = d["count"]
    return f"p95/p99 of {n} samples: read as the worst few" if 0 < n < FEW_SAMPLES else ""


def _rollout_html(r: dict[str, Any]) -> str:
    steps = _table(
        ["release", "step", "devices", "seconds", "state", "offers", "counts"],
        (
            [
                f"{release['version']}{' (broken)' if release['selftest_fails'] else ''}",
                f"{step['percent']:g}%",
                step["devices"],
                step["seconds"],
                step["state"],
                step["offers"],
                " ".join(f"{k}={v}" for k, v in step["counts"].items()),
            ]
            for release in r["releases"]
            for step in release["steps"]
        ),
    )
    releases = _table(
        ["release", "state", "seconds", "rolled back", "presses during it", "why paused"],
        (
            [
                x["version"],
                x["state"],
                x["seconds"],
                x["rolled_back"],
                x["presses_during"],
                x["paused_because"] or "",
            ]
            for x in r["releases"]
        ),
    )
    running = " ".join(f"{v}: {n}" for v, n in r["running_at_end"].items())
    return (
        f"<h2>Rollouts to {html.escape(r['district'])} (installed {html.escape(r['installed'])})"
        f"</h2>{releases}<h3>Steps</h3>{steps}<p>Running at the end: {html.escape(running)}; "
        f"agent restarts: {r['agent_restarts']}.</p>"
    )


def _html(summary: dict[str, Any], plots: list[Path]) -> str:
    e = html.escape
    verdict_text = "PASSED" if summary["passed"] else "FAILED"
    colour = "#1a7f37" if summary["passed"] else "#cf222e"
    result = {True: "pass", False: "FAIL", None: "no threshold"}
    checks_table = _table(
        ["figure", "value", "threshold", "result", "note"],
        (
            [
                c["figure"],
                "none"
                if c["value"] is None
                else f"{c['value']}{' ' + c['unit'] if c['unit'] else ''}",
                ""
                if c["threshold"] is None
                else f"{c['limit']} {c['threshold']:g}{' ' + c['unit'] if c['unit'] else ''}",
                result[c["ok"]],
                c["note"],
            ]
            for c in summary["checks"]
        ),
    )
    a = summary["alerts"]
    alerts_table = _table(["figure", "value"], ([k, v] for k, v in a.items() if k != "by_trigger"))
    trigger_table = _table(["trigger", "messages"], a["by_trigger"].items())
    plan_table = _table(
        ["kind", "planned", "done", "made its device send", "why they differ"],
        (
            [r["kind"], r["planned"], r["done"], r["sent"], r["reason"]]
            for r in summary["planned_vs_sent"]
        ),
    )
    lat_table = _table(
        ["", *DISTRIBUTION, "note"],
        ([k, *(v[c] for c in DISTRIBUTION), _few(v)] for k, v in summary["latency_s"].items()),
    )
    v = summary["video"]
    video_table = _table(
        ["streams", *DISTRIBUTION, "note"],
        [
            [
                f"offered {v['offered']}, connected {v['connected']}",
                *[""] * (len(DISTRIBUTION) + 1),
            ],
            *(
                [name, *(v[key][c] for c in DISTRIBUTION), _few(v[key])]
                for name, key in (
                    ("offer to connected, s", "offer_to_connected_s"),
                    ("alert to connected, s", "alert_to_connected_s"),
                )
            ),
        ],
    )
    no_video = v["doorbells_without_video"]
    no_video_table = (
        _table(
            ["doorbell", "its alerts", "why no video"],
            ([d["device"], d["alerts"], d["why"]] for d in no_video),
        )
        if no_video
        else "<p>Every doorbell offered video.</p>"
    )
    offline = summary["offline_detection_s"]
    offline_table = _table(
        ["partitioned devices reported offline", *DISTRIBUTION, "note"],
        [[summary["offline_detected"], *(offline[c] for c in DISTRIBUTION), _few(offline)]],
    )
    district_table = _table(
        ["district", "devices", "alerts", "mean s", "p95 s", "max s", "lost", "availability"],
        (
            [
                name,
                d["devices"],
                d["alerts"],
                d["transmission_mean_s"],
                d["transmission_p95_s"],
                d["transmission_max_s"],
                d["lost"],
                d["availability"],
            ]
            for name, d in summary["districts"].items()
        ),
    )
    faults = "".join(
        f"<li>{f['at_s']} s: {e(f['label'])}"
        + (f" (until {f['until_s']} s)" if f["until_s"] is not None else "")
        + "</li>"
        for f in summary["faults"]
    )
    failures = "".join(f"<li>{e(f)}</li>" for f in summary["failures"])
    todo = "".join(f"<li>{e(t)}</li>" for t in summary["todo"])
    images = "".join(f'<p><img src="{e(p.name)}" alt="{e(p.stem)}"></p>' for p in plots)
    reconnect = _cell(summary["reconnect_after_broker_restart_s"]) or "no broker restart"
    rollout = _rollout_html(summary["rollout"]) if "rollout" in summary else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Simulation: {e(summary["scenario"])}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem}}</style>
</head><body>
<h1>{e(summary["scenario"])}: <span style="color:{colour}">{verdict_text}</span></h1>
<p>{e(summary["description"])}</p>
<p>{summary["devices"]} devices ({e(_cell(summary["mix"]))}), seed {summary["seed"]},
{summary["duration_s"]:g} s scenario (time scale {summary["time_scale"]:g}),
{summary["wall_s"]} s with the drain.</p>
{f"<h2>Failures</h2><ul>{failures}</ul>" if failures else ""}
<h2>Figures and thresholds</h2>{checks_table}
<h2>Planned and sent, per kind of action</h2>{plan_table}
<p>Presses during an incident are coalesced into one update: fewer alerts than presses is
by design.</p>
<h2>Alerts</h2>{alerts_table}
<h3>By trigger</h3>{trigger_table}
<h2>Latency (seconds from leaving the device)</h2>{lat_table}
<h2>Video</h2>{video_table}
<h3>Doorbells that offered no video</h3>{no_video_table}
<h2>Offline detection (seconds from the cut)</h2>{offline_table}
<p>Reconnect after broker restart: {e(reconnect)} s.
Presses on a black-holed link never found dead: {summary["dead_links_not_found"]}.</p>
<h2>Districts (EN 50136 terms)</h2>{district_table}
<h2>Faults</h2><ul>{faults or "<li>none</li>"}</ul>
{rollout}
{f"<h2>Not simulated yet</h2><ul>{todo}</ul>" if todo else ""}
{images}
</body></html>
"""
