"""The operator's unit of work: one incident per bell in trouble, not one card per message.

The gateway owns incidents (docs/incidents.md) and puts `incident_id`, `kind` and
`priority` beside each delivery's JWS; the console groups the events it received by that
id. A gateway older than incidents sends none: then the console groups by bell, from its
first alert until the card is closed, deciding kind and priority the way the gateway does,
so an old gateway's bell still makes one card, not one per press.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from console.receiver import ReceivedEvent
from protocol.messages import LINK_DOWN_OF_STATE

# docs/incidents.md's kinds, most urgent first, with their default priorities
DEFAULT_PRIORITIES: dict[str, int] = {
    "duress": 1,
    "store_robbery": 2,
    "stalking_urgent": 3,
    "stalking": 4,
    "doorbell_emergency": 5,
    "tamper": 6,
    "power_lost": 7,
    "district_outage": 8,
    "offline": 9,
    "doorbell_ring": 10,
}
LOWEST_PRIORITY = max(DEFAULT_PRIORITIES.values()) + 1
STAGE_ORDER = ("new", "acknowledged", "dispatched", "closed")
# alerts that are news, not trouble: they attach to an open incident, never open one (a
# test press is a bell proving its path: shown as a test among the device events)
_NEWS_TRIGGERS = frozenset({"tamper_cleared", "power_restored", "test"})


def kind_of(event: ReceivedEvent, device_kind: str) -> str | None:
    """The incident kind an event of a gateway without incidents stands for (as the
    gateway decides it, docs/incidents.md), or None for an event that opens none."""
    body = event.body
    if event.type == "alert":
        trigger = str(body.get("trigger", ""))
        bell = str(body.get("bell", ""))
        if trigger == "duress":
            return "duress"
        if trigger == "tamper":
            return "tamper"
        if trigger == "power_loss":
            return "power_lost"
        if trigger in _NEWS_TRIGGERS:
            return None
        if device_kind == "doorbell" or bell == "doorbell":
            if trigger == "doorbell_ring" and not body.get("urgent"):
                return "doorbell_ring"
            return "doorbell_emergency"
        if bell == "store" and body.get("silent"):
            return "store_robbery"
        if body.get("urgent") or trigger == "long_press":
            return "stalking_urgent"
        return "stalking"
    if event.type == "heartbeat" and body.get("power") == "battery":
        return "power_lost"
    if event.type == "status" and body.get("state") == "offline":
        return "offline"
    return None


@dataclass
class Incident:
    id: str
    device_id: str
    district: str
    kind: str
    priority: int
    opened_ms: int
    first_alert_id: str
    # True when grouped here (an old gateway): actions go to the first alert's routes
    grouped_by_console: bool
    events: list[ReceivedEvent] = field(default_factory=list)
    state: str = "new"
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    escalation_level: int = 0
    escalated_to: list[str] = field(default_factory=list)
    offline: bool = False
    # the gateway's time of what set `offline`: the last connection state attached (its
    # signed ts), or the gateway summary that told it (its updated_ms); the newer wins
    offline_at_ms: int = -1
    cancelled: bool = False
    outcome: str | None = None

    def attach(self, event: ReceivedEvent, kind: str | None, priority: int) -> None:
        self.events.append(event)
        if kind is not None and priority < self.priority:
            self.kind, self.priority = kind, priority  # upgraded, never downgraded
        state = event.body.get("state") if event.type == "status" else None
        down = LINK_DOWN_OF_STATE.get(state) if isinstance(state, str) else None
        # statuses are the gateway's (signed with its clock, as the summary's times are);
        # one older than what the card shows already came late and tells nothing new
        if down is not None and event.ts_ms >= self.offline_at_ms:
            self.offline, self.offline_at_ms = down, event.ts_ms
        if event.type == "cancel":
            self.cancelled = True
        if event.type == "escalation":
            level = event.body.get("level")
            if isinstance(level, int) and level > self.escalation_level:
                self.escalation_level = level
                self.escalated_to.append(str(event.body.get("to", "")))

    def move(self, stage: str, at_ms: int, actor: str) -> None:
        """A stage reached (forward only, as at the gateway)."""
        if stage not in STAGE_ORDER:
            return
        self.stages.setdefault(stage, {"at_ms": at_ms, "actor": actor})
        if STAGE_ORDER.index(stage) > STAGE_ORDER.index(self.state):
            self.state = stage

    def json(self) -> dict[str, Any]:
        last = self.events[-1] if self.events else None
        return {
            "id": self.id,
            "device_id": self.device_id,
            "district": self.district,
            "kind": self.kind,
            "priority": self.priority,
            "state": self.state,
            "opened_ms": self.opened_ms,
            "updated_ms": last.received_ms if last else self.opened_ms,
            "first_alert_id": self.first_alert_id,
            "events": len(self.events),
            "presses": sum(int(e.body.get("presses", 1)) for e in self.events if e.type == "alert"),
            "offline": self.offline,
            "cancelled": self.cancelled,
            "escalation_level": self.escalation_level,
            "escalated_to": list(self.escalated_to),
            "stages": self.stages,
            "outcome": self.outcome,
            "grouped_by_console": self.grouped_by_console,
        }


def group(
    events: Iterable[ReceivedEvent],
    device_kinds: Mapping[str, str],
    stages: Mapping[str, list[dict[str, Any]]],
    district_of: Mapping[str, str],
    priorities: Mapping[str, int] = DEFAULT_PRIORITIES,
) -> tuple[list[Incident], list[ReceivedEvent]]:
    """Incidents of `events` (any order), with the stages the console recorded for them
    (incident id -> [{stage, at_ms, operator}]), and the events that belong to none.

    An event carrying an incident id joins that incident. One without (an old gateway)
    joins its bell's open incident, or opens one if it is trouble (`kind_of`); an
    incident the console closed takes no more events, so the next press is a new card.
    """
    incidents: dict[str, Incident] = {}
    open_of_device: dict[str, Incident] = {}  # console-grouped, not yet closed
    loose: list[ReceivedEvent] = []
    for event in sorted(events, key=lambda e: (e.received_ms, e.event_id)):
        device_kind = device_kinds.get(event.device_id, "")
        kind = event.kind or kind_of(event, device_kind)
        priority = event.priority or priorities.get(kind or "", LOWEST_PRIORITY)
        incident: Incident | None = None
        if event.incident_id:
            incident = incidents.get(event.incident_id)
            if incident is None:
                incident = _opened(
                    event.incident_id, event, kind or "", priority, district_of, False
                )
                incidents[incident.id] = incident
        else:
            incident = open_of_device.get(event.device_id)
            if incident is not None and _closed_by(stages.get(incident.id, []), event):
                del open_of_device[event.device_id]  # closed before this event came
                incident = None
            if incident is None and kind is not None:
                incident = _opened(event.event_id, event, kind, priority, district_of, True)
                incidents[incident.id] = incident
                open_of_device[event.device_id] = incident
        if incident is None:
            loose.append(event)
            continue
        incident.attach(event, kind, priority)
    for incident in incidents.values():
        for mark in stages.get(incident.id, []):
            incident.move(mark["stage"], mark["at_ms"], mark["operator"])
    return list(incidents.values()), loose


def _closed_by(marks: list[dict[str, Any]], event: ReceivedEvent) -> bool:
    return any(m["stage"] == "closed" and m["at_ms"] <= event.received_ms for m in marks)


def _opened(
    incident_id: str,
    event: ReceivedEvent,
    kind: str,
    priority: int,
    district_of: Mapping[str, str],
    grouped_by_console: bool,
) -> Incident:
    return Incident(
        id=incident_id,
        device_id=event.device_id,
        district=event.district or district_of.get(event.device_id, ""),
        kind=kind,
        priority=priority,
        opened_ms=event.received_ms,
        first_alert_id=event.event_id,
        grouped_by_console=grouped_by_console,
    )


def merge_gateway(incident: Incident, summary: Mapping[str, Any]) -> None:
    """What the gateway knows of an incident beyond the events this console received:
    its stage (another desk may have moved it), escalation (its steps are forwarded to
    other centres), offline, kind and priority now."""
    opened = summary.get("opened_ms")
    if type(opened) is int and 0 < opened < incident.opened_ms:
        # its first event may have reached this console late (or before it started)
        incident.opened_ms = opened
    kind, priority = summary.get("kind"), summary.get("priority")
    if isinstance(kind, str) and type(priority) is int and priority < incident.priority:
        incident.kind, incident.priority = kind, priority
    for stage, mark in (summary.get("stages") or {}).items():
        if isinstance(mark, dict) and stage in STAGE_ORDER:
            incident.move(stage, int(mark.get("at_ms") or 0), str(mark.get("actor") or ""))
    state = summary.get("state")
    if isinstance(state, str) and state in STAGE_ORDER:
        incident.move(state, int(summary.get("updated_ms") or 0), "")
    level = summary.get("escalation_level")
    if type(level) is int and level > incident.escalation_level:
        incident.escalation_level = level
        incident.escalated_to = [str(c) for c in summary.get("escalated_to") or []]
    # the summary the console last fetched may be older than a status received since (an
    # outage restored in between): the mark is the newer one's, by the gateway's clock
    updated = summary.get("updated_ms")
    at_ms = updated if type(updated) is int else 0
    if isinstance(summary.get("offline"), bool) and at_ms > incident.offline_at_ms:
        incident.offline, incident.offline_at_ms = bool(summary["offline"]), at_ms


def queue_order(incident: Incident) -> tuple[int, int]:
    """The desk's order: most urgent priority first, then the oldest."""
    return (incident.priority, incident.opened_ms)
