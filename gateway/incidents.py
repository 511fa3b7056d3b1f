"""Incidents: one per bell in trouble, the unit an operator handles (docs/incidents.md).

What this module decides, without any I/O: which kind of incident an event is (`kind_of`),
how urgent each kind is (`Priorities`), and when an unacknowledged incident takes its next
escalation step (`Escalator`, driven by an injected clock). The store keeps incidents and
attaches events to them in the same transaction that keeps the event (gateway/store.py), so
an incident never misses an event that was acked to its bell.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal, Protocol, get_args

from protocol.clock import wall_ms
from protocol.messages import LINK_DOWN_OF_STATE, AckStage, Body, Escalation, Message

log = logging.getLogger(__name__)

# worst first: the default priorities are these positions, 1 = highest
IncidentKind = Literal[
    "duress",
    "store_robbery",
    "stalking_urgent",
    "stalking",
    "doorbell_emergency",
    "tamper",
    "power_lost",
    "district_outage",
    "offline",
    "doorbell_ring",
]
# worst first: the default priorities are these positions, 1 = highest
KINDS: Final[tuple[IncidentKind, ...]] = get_args(IncidentKind)
DEFAULT_PRIORITIES: Final[Mapping[str, int]] = {k: i + 1 for i, k in enumerate(KINDS)}

IncidentState = Literal["new", "acknowledged", "dispatched", "closed"]
INCIDENT_STATES: Final[tuple[IncidentState, ...]] = get_args(IncidentState)
Outcome = Literal["real", "false_alarm", "test", "cancelled_by_user", "duress"]
OperatorStage = Literal["acknowledged", "dispatched", "closed"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "real",
    "false_alarm",
    "test",
    "cancelled_by_user",
    "duress",
)

# the alert's `bell` when a body leaves it out, from the registered device kind
_BELL_OF_DEVICE: Final = {"bell": "emergency", "doorbell": "doorbell", "store": "store"}


def json_object(text: str) -> dict[str, Any]:
    """A body as a dict; {} for one that is not a JSON object (an older or foreign row must
    never stop the event it belongs to from being kept)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def is_test_press(event_type: str, body_json: str) -> bool:
    """A bell proving its path (`trigger = "test"`): kept, forwarded and acked like any
    alert, but never part of an incident, so never escalated, and never dispatched."""
    return is_test_body(event_type, json_object(body_json))


def is_test_body(event_type: str, body: Mapping[str, Any]) -> bool:
    """`is_test_press` of a body already parsed."""
    return event_type == "alert" and body.get("trigger") == "test"


# A person in danger, as opposed to news about a bell (offline, an outage, power, tamper,
# a visitor's ring).
EMERGENCIES: Final[frozenset[str]] = frozenset(
    {"duress", "store_robbery", "stalking_urgent", "stalking", "doorbell_emergency"}
)


def reopens(old_kind: str, new_kind: str | None) -> bool:
    """An emergency arriving on an incident that was not one: what an operator acknowledged
    (a bell offline, its district's outage, a ring) is not this, so the incident needs
    acknowledging again, escalates again, and its bell is not told `acknowledged`."""
    return new_kind in EMERGENCIES and old_kind not in EMERGENCIES


def kind_of(device_kind: str, event_type: str, body: Mapping[str, Any]) -> IncidentKind | None:
    """The incident kind an event opens (its body parsed: `json_object`), or None for an
    event that only attaches.

    Never raises for what a body holds: the body was validated when kept, but a gateway's
    own event or an older row may leave fields out, which then take the protocol defaults.
    """
    if event_type == "status":
        state = body.get("state")
        return state if state in ("offline", "district_outage") else None
    if event_type == "heartbeat":  # kept only when its power source changed
        return "power_lost" if body.get("power") == "battery" else None
    if event_type != "alert":
        return None
    trigger = body.get("trigger", "press")
    bell = body.get("bell") or _BELL_OF_DEVICE.get(device_kind, "emergency")
    urgent = bool(body.get("urgent"))
    if trigger == "duress":
        return "duress"
    if trigger == "tamper":
        return "tamper"
    if trigger == "power_loss":
        return "power_lost"
    if trigger in ("tamper_cleared", "power_restored", "test"):
        # news, not trouble; a test press proves the bell's path (gateway/testwatch.py) and
        # must never open an incident that would escalate to the police line
        return None
    if bell == "doorbell":
        # a ring made urgent on the bell is a visitor who became an emergency
        return (
            "doorbell_ring" if trigger == "doorbell_ring" and not urgent else "doorbell_emergency"
        )
    if bell == "store" and body.get("silent"):
        return "store_robbery"
    return "stalking_urgent" if urgent or trigger == "long_press" else "stalking"


def offline_of(event_type: str, body: Mapping[str, Any]) -> bool | None:
    """True or False when the event tells the bell's link is down or up; None if not."""
    state = body.get("state") if event_type == "status" else None
    return LINK_DOWN_OF_STATE.get(state) if isinstance(state, str) else None


def joins_outage(kind: IncidentKind | None) -> bool:
    """A bell going offline while its district's outage is open joins the outage's incident
    (gateway/supervise.py tells the outage before its bells' own offline events): one
    incident for the district, not one per bell, and one escalation."""
    return kind == "offline"


# The statuses about a district rather than its bell (gateway/supervise.py sends them about
# the outage's first bell): they belong to the district's outage incident, never to that
# bell's own.
OUTAGE_STATES: Final[frozenset[str]] = frozenset({"district_outage", "district_restored"})


def about_a_district(event_type: str, body_json: str, incident_kind: str | None) -> bool:
    """Whether an event is about a district (its outage's statuses, its outage incident's
    escalations) rather than the bell it is told about: it must not carry that bell's
    address to a centre, nor show its person on a card."""
    if incident_kind == "district_outage":
        return True
    return event_type == "status" and json_object(body_json).get("state") in OUTAGE_STATES


class KeptEvent(Protocol):
    """What the decision reads of an event being kept (gateway/store.py's Incoming)."""

    @property
    def event_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def body_json(self) -> str: ...


@dataclass
class OpenIncident:
    """An open incident as a store reads it, changed as each decided event leaves it."""

    device_id: str
    incident_id: str
    kind: str
    priority: int
    state: str
    updated_ms: int
    events: int
    first_alert_id: str | None
    last_alert_id: str | None
    offline: bool
    # an outage's district, as it opened (its first bell may move); the store holds one
    # open outage per district, whichever instance told it (None for a bell's own)
    district: str | None = None
    events_added: int = 0  # by the events being decided now (0: nothing to write)
    reopened: bool = False  # acknowledged as something else, new again (`reopens`)

    @property
    def is_outage(self) -> bool:
        return self.kind == "district_outage"


@dataclass
class Attached:
    """What the decision tells a store to write, in order."""

    attached: list[tuple[str, str]] = field(default_factory=list)  # (event id, incident id)
    # (incident id, what, actor, event id, detail)
    history: list[tuple[str, str, str, str, dict[str, Any]]] = field(default_factory=list)
    caught_up: dict[str, str] = field(default_factory=dict)  # alert -> its incident's stage


def decide_incidents(
    items: Sequence[KeptEvent],
    bells: Mapping[str, tuple[str, str]],
    own: dict[str, OpenIncident],
    outages: dict[str, OpenIncident],
    priority: Callable[[str], int],
    now_ms: int,
) -> Attached:
    """Which incident each event opens or joins, event after event, for every store engine.

    `bells`: device -> (device kind, district) for the events' devices; `own`: each bell's
    own open incident; `outages`: each district's open outage incident. Both are changed as
    each event leaves them, so the next event sees it; the store writes those whose
    `events_added` is not 0. One open incident per originator and kind of originator: a
    bell's own, and its district's outage (about the outage's first bell, but not that
    bell's: the bell pressed during the outage is a person in trouble, its own incident).
    """
    done = Attached()
    for item in items:
        bell = bells.get(item.device_id)
        if bell is None:
            continue  # an event about the gateway itself (disk_low): no bell, no incident
        if item.type == "escalation":
            continue  # attached by the store's `escalate`
        body = json_object(item.body_json)  # once: an alert is decided on the loop's core
        if is_test_body(item.type, body):
            continue  # a test joins no incident
        device_kind, district = bell
        kind = kind_of(device_kind, item.type, body)
        offline = offline_of(item.type, body)
        first_alert = item.event_id if item.type == "alert" else None
        about_district = item.type == "status" and body.get("state") in OUTAGE_STATES
        found: OpenIncident | None
        if about_district:
            found = outages.get(district)
        else:
            found = own.get(item.device_id)
            outage = outages.get(district)
            if found is None and joins_outage(kind) and outage is not None and outage.offline:
                found = outage
        if found is None:
            if kind is None:
                continue
            incident = OpenIncident(
                item.device_id,
                item.event_id,
                kind,
                priority(kind),
                "new",
                now_ms,
                0,
                first_alert,
                first_alert,
                bool(offline),
                district if about_district else None,
            )
            if about_district:
                outages[district] = incident
            else:
                own[item.device_id] = incident
        else:
            incident = found
            incident.updated_ms = max(incident.updated_ms, now_ms)
            incident.first_alert_id = incident.first_alert_id or first_alert
            incident.last_alert_id = first_alert or incident.last_alert_id
            incident.offline = incident.offline if offline is None else offline
        incident.events += 1
        incident.events_added += 1
        done.attached.append((item.event_id, incident.incident_id))
        actor = "device" if item.type in ("alert", "cancel", "health", "heartbeat") else "gateway"
        done.history.append(
            (incident.incident_id, "event", actor, item.event_id, {"type": item.type, "body": body})
        )
        # a worse event came (a ring that became an emergency, duress): the incident is it;
        # an outage stays the district's, whatever the priorities say of a bell offline in it
        joined = found is not None and not incident.is_outage
        if joined and kind is not None and priority(kind) < incident.priority:
            reopened = incident.state != "new" and reopens(incident.kind, kind)
            detail: dict[str, Any] = {"from": incident.kind, "to": kind}
            detail |= {"reopened": True} if reopened else {}
            done.history.append((incident.incident_id, "kind", "gateway", item.event_id, detail))
            incident.kind, incident.priority = kind, priority(kind)
            if reopened:
                # acknowledged as something else: new again, its escalation from now
                incident.state, incident.reopened = "new", True
        if found is not None and incident.state != "new" and item.type == "alert":
            done.caught_up[item.event_id] = incident.state
    return done


class Priorities:
    """Kind -> priority (1 = highest), the configured ones over the default order."""

    def __init__(self, configured: Mapping[str, int] | None = None) -> None:
        self._of = {**DEFAULT_PRIORITIES, **(configured or {})}

    def __call__(self, kind: str) -> int:
        return self._of.get(kind, len(KINDS) + 1)


@dataclass(frozen=True, slots=True)
class Incident:
    incident_id: str
    device_id: str
    district: str
    kind: str
    priority: int
    state: IncidentState
    opened_ms: int
    updated_ms: int
    first_alert_id: str | None
    events: int
    offline: bool
    escalation_level: int
    escalated_to: tuple[str, ...]
    outcome: str | None = None
    # stage -> (at_ms, actor)
    stages: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    last_alert_id: str | None = None

    @property
    def bell_refs(self) -> tuple[str, ...]:
        """The alert ids the bell's acks name: the first, and the newest if another. A bell
        whose own incident ended (a cancel on the bell) while this one stayed open knows
        only its newer alerts; a bell still in the first one ignores an id it does not
        know, or takes it as the same incident's (both are its own alerts)."""
        refs = (self.first_alert_id, self.last_alert_id)
        return tuple(dict.fromkeys(r for r in refs if r is not None))


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    at_ms: int
    what: Literal["event", "stage", "escalation", "procedure", "kind"]
    actor: str
    event_id: str | None
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ProcedureStep:
    step: str
    ko: str
    en: str


class EscalationStore(Protocol):
    async def escalation_candidates(self, max_level: int) -> list[Incident]: ...
    async def escalate(
        self,
        incident_id: str,
        level: int,
        to: str,
        event: tuple[str, int, int, str, str],
        now_ms: int,
    ) -> bool: ...


class Sealer(Protocol):
    def sealed(self, device_id: str, body: Body) -> tuple[Message, str]: ...


# the shortest the escalation loop sleeps between two ticks
MIN_WAIT_S: Final = 0.02


class Escalator:
    """Escalates incidents nobody acknowledged, one chain step per `after_s(priority)`.

    Step n (1-based) is due at opened + n x after: the deadline follows from what the store
    holds (opened_ms, escalation_level), so a restarted gateway continues where it was, and
    the step is taken by a conditional update on the level, so with several instances
    exactly one takes it. Each step is a gateway-signed `escalation` event about the bell,
    forwarded to the step's centre only.
    """

    def __init__(
        self,
        store: EscalationStore,
        sealer: Sealer,
        chain: Sequence[str],
        after_s: Callable[[int], float],
        *,
        clock_ms: Callable[[], int] | None = None,
        on_step: Callable[[Incident, str], None] | None = None,
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._chain = tuple(chain)
        self._after_s = after_s
        self._clock_ms = clock_ms or wall_ms
        self._on_step = on_step
        # the earliest step still to come as the last tick saw it: `run` wakes for it
        self.next_due_ms: int | None = None

    def due_ms(self, incident: Incident) -> int | None:
        """When its next step is due; None when the chain is used up."""
        if incident.escalation_level >= len(self._chain):
            return None
        after_ms = int(self._after_s(incident.priority) * 1000)
        return incident.opened_ms + (incident.escalation_level + 1) * after_ms

    async def tick(self) -> int:
        """Take every step that is due now; the number taken."""
        if not self._chain:
            return 0
        now_ms = self._clock_ms()
        taken = 0
        coming: list[int] = []
        for incident in await self._store.escalation_candidates(len(self._chain)):
            due = self.due_ms(incident)
            if due is not None and due > now_ms:
                coming.append(due)
            if due is None or due > now_ms:
                continue
            level = incident.escalation_level + 1
            to = self._chain[level - 1]
            message, token = self._sealer.sealed(
                incident.device_id,
                Escalation(
                    incident=incident.incident_id,
                    level=level,
                    to=to,
                    kind=incident.kind,
                    priority=incident.priority,
                ),
            )
            event = (message.id, message.seq, message.ts, message.body.model_dump_json(), token)
            if await self._store.escalate(incident.incident_id, level, to, event, now_ms):
                taken += 1
                after = self.due_ms(replace(incident, escalation_level=level))
                coming += [] if after is None else [after]
                log.warning(
                    "incident %s (%s, %s) not acknowledged: escalated to %s (step %d)",
                    incident.incident_id,
                    incident.device_id,
                    incident.kind,
                    to,
                    level,
                )
                if self._on_step is not None:
                    self._on_step(incident, to)
        self.next_due_ms = min(coming, default=None)
        return taken

    async def run(self, interval_s: float = 1.0) -> None:
        """Tick every `interval_s`, and at the next step's due time when that is sooner (a
        step then fires at its deadline, not up to `interval_s` after it), until cancelled;
        a failed tick waits for the next. An incident opened since the last tick is due
        after its whole first interval: a tick meanwhile learns it."""
        while True:
            wait_s = interval_s
            try:
                await self.tick()
            except Exception:
                log.exception("escalation: a tick failed; trying again at the next")
            else:
                if self.next_due_ms is not None:
                    until_due_s = (self.next_due_ms - self._clock_ms()) / 1000
                    # never a busy loop, whatever the store answered
                    wait_s = min(interval_s, max(MIN_WAIT_S, until_due_s))
            await asyncio.sleep(wait_s)


def _steps(*names: str) -> tuple[ProcedureStep, ...]:
    return tuple(ProcedureStep(n, *_STEP_TEXT[n]) for n in names)


_STEP_TEXT: Final[Mapping[str, tuple[str, str]]] = {
    "call_victim": ("피해자에게 전화하기", "Call the victim"),
    "view_camera": ("현관 카메라 영상 보기", "View the door camera"),
    "call_guardian": ("보호자에게 전화하기", "Call the guardian"),
    "request_dispatch": ("경찰 출동 요청하기", "Request dispatch"),
    "confirm_safe": ("안전 확인하기", "Confirm the person is safe"),
    "check_device": ("기기 상태 확인하기", "Check the bell's state"),
    "check_district": ("구역 통신망·정전 여부 확인하기", "Check the district's network and power"),
    "notify_district": ("구청 상황실에 알리기", "Tell the district office"),
}
_PERSON = _steps("call_victim", "call_guardian", "request_dispatch", "confirm_safe")
# a duress press or a silent robbery: never call the phone first, it may give the victim away
_SILENT = _steps("request_dispatch", "call_guardian", "confirm_safe")
_DOOR = _steps("view_camera", "call_victim", "call_guardian", "request_dispatch", "confirm_safe")
_DEVICE = _steps("check_device", "call_victim")
# the checklist per kind when [[incidents.procedure]] does not name the kind; every kind
# has one, or its card shows the operator nothing to do
DEFAULT_PROCEDURES: Final[Mapping[str, tuple[ProcedureStep, ...]]] = {
    "duress": _SILENT,
    "store_robbery": _SILENT,
    "stalking_urgent": _PERSON,
    "stalking": _PERSON,
    "doorbell_emergency": _DOOR,
    "tamper": _DEVICE,
    "power_lost": _DEVICE,
    # many bells dark at once: their network or power, not one person to call
    "district_outage": _steps("check_district", "notify_district"),
    "offline": _DEVICE,
    "doorbell_ring": _steps("view_camera"),
}


class StageStore(Protocol):
    async def move_incident(
        self, incident_id: str, stage: str, now_ms: int, actor: str, outcome: str | None = None
    ) -> bool: ...


class AckSender(Protocol):
    def ack(self, device_id: str, ref: str, stage: AckStage) -> asyncio.Future[None]: ...


async def move_incident(
    store: StageStore,
    downlink: AckSender,
    incident: Incident,
    stage: OperatorStage,
    now_ms: int,
    actor: str,
    outcome: str | None = None,
) -> bool:
    """Move an incident forward and tell its bell: one ack per stage per incident, naming
    its first alert (the ref the bell knows), and its newest alert too when that is another
    (`Incident.bell_refs`); False if it was there or beyond already."""
    moved = await store.move_incident(incident.incident_id, stage, now_ms, actor, outcome)
    if moved:
        log.info(
            "incident %s (%s, %s) moved to %s by %s%s",
            incident.incident_id,
            incident.device_id,
            incident.kind,
            stage,
            actor,
            f" ({outcome})" if outcome else "",
        )
        for ref in incident.bell_refs:
            # fire and forget, as for alerts: paho queues it while the broker is away
            downlink.ack(incident.device_id, ref, stage)
    return moved
