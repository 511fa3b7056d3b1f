"""What a press means: the device's behaviour as one explicit state machine.

The machine does no I/O. It takes input events, verified acks and link changes, and
returns *effects* (`Send` a message, `Show` a pattern) for the agent to carry out. Time
comes in as an argument (`now`, seconds on any monotonic clock) and hold lengths come
from the hardware's `held_for`, so tests drive every rule without sleeping.

## Incident states

```
 idle ──alert──▶ sent ──▶ received ──▶ delivered ──▶ acknowledged ──▶ dispatched
   ▲               │  acks only move forward; a late or repeated ack changes nothing
   │               ├── closed (ack) ────────────────────────────────────▶ cleared
   │               ├── cancel / duress (gesture) ───────────────────────▶ cleared
   └─ cleared ◀────┘                     cleared ──alert──▶ sent (a new incident)
```
`sent` is the issue's "alerting": the alert is out and the device waits for the gateway.
Every active state also takes `coalesce` (one more press, same incident). `TRANSITIONS`
below is the whole table; anything else raises `IllegalTransition`, naming the event and
the state. The link (up or down) is tracked beside the incident, not inside it.

## Gestures (hold lengths from `[behaviour]` in device.toml)

`GESTURES` below is the emergency button's chart: one press, its phase and the hold length
it has reached, to its next phase and what it means. docs/behaviour.md draws both charts
(`python -m device.charts --write`; a test fails when the drawing is out of date).

- **Emergency button, no incident** (bell, store bell, a doorbell's emergency button): the
  press sends the alert at once, on the edge. Held to `long_press_s` (3 s), the incident
  becomes urgent.
- **Emergency button during an incident**: the hold is judged when it is released (or
  reaches the duress length), because it may be a cancel:
  - shorter than `long_press_s`: one more press; `long_press_s` or more: a press, urgent;
  - released after `cancel_hold_s` (10 s): `cancel` is sent;
  - still held at `duress_hold_s` (15 s): `duress` is sent, an alert linked to the
    incident. The device shows the cancel pattern at `cancel_hold_s` in both cases and
    nothing more afterwards, not even later acks: whoever forced the cancel sees a cancel.
  - closed by the centre while the button is down and the hold still short: judged as a
    press (or urgent), it opens a new incident; a press is never lost to a close that
    crossed it. A hold already long then is taken as a cancel on its way: nothing, unless
    it reaches duress, which is sent whatever ended the incident.
- **Coalescing**: extra presses and urgency never open a new incident. They are counted,
  and one update is sent (a new alert with `presses` = total so far, `urgent`, and
  `linked_to` = the incident's first alert) once the previous message of the incident has
  been `received`. A person pressing twenty times sends two or three messages, and the
  centre learns the count. Updates are new messages because the gateway treats a known
  message id as a resend and forwards nothing new.
- **Doorbell button**: the press is a ring (`doorbell_ring`, not an emergency). Held to
  `long_press_s`, it becomes an emergency linked to that ring; the emergency button within
  `ring_link_s` of a ring is linked to the ring too.
- **Tamper and mains power**: each change is an alert of its own (tamper, tamper_cleared,
  power_loss, power_restored) outside the incident, shown on nothing.
- **SMS fallback** (`device/sms.py`): when an alert of the incident goes out by SMS, the
  incident shows "trying SMS" and then "sent by SMS" instead of `sending` / `received`,
  until the centre has it (`delivered` and beyond show as usual); if no SMS could be sent,
  it shows `sending` / `received` again. An SMS for anything
  outside the incident (a duress alert, which must look like a cancel) shows nothing, and
  in silent mode no SMS shows anything: the incident's own pattern stays.
- **Silent mode** (store bells by default): alerts say `silent`, and every pattern is shown
  with `silent=True`, which the indicator turns into no sound and no light.

The incident lives in memory only: after a restart the device is idle, and its outbox
still resends whatever the gateway has not acknowledged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from ansimi.logs import DECISION
from device.config import BehaviourSection
from device.errors import DeviceError
from device.hal.ports import ButtonName, InputEvent, Pattern
from protocol.ids import new_message_id
from protocol.messages import ACK_STAGES, Ack, Alert, Cancel, DeviceKind

log = logging.getLogger(__name__)

Bell = Literal["emergency", "doorbell", "store"]
BELL_OF: Final[Mapping[DeviceKind, Bell]] = {
    "bell": "emergency",
    "doorbell": "doorbell",
    "store": "store",
}


# What the SMS fallback reports for one alert: "trying", then "sent" (a number has it) or
# "failed" (every number failed every try; the alert still goes by MQTT).
SmsProgress = Literal["trying", "sent", "failed"]


class State(enum.StrEnum):
    IDLE = "idle"
    SENT = "sent"  # alerting: sent, waiting for the gateway
    RECEIVED = "received"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    DISPATCHED = "dispatched"
    CLEARED = "cleared"


class Event(enum.StrEnum):
    ALERT = "alert"
    COALESCE = "coalesce"
    RECEIVED = "received"
    DELIVERED = "delivered"
    ACKNOWLEDGED = "acknowledged"
    DISPATCHED = "dispatched"
    CLOSED = "closed"
    CANCEL = "cancel"
    DURESS = "duress"


# An incident in progress, in the order acks move it.
ACTIVE: Final = (State.SENT, State.RECEIVED, State.DELIVERED, State.ACKNOWLEDGED, State.DISPATCHED)
# States in which the centre does not have the alert yet: the SMS fallback's pattern wins.
NOT_DELIVERED: Final = frozenset({State.SENT, State.RECEIVED})


def _table() -> dict[tuple[State, Event], State]:
    table = {
        (State.IDLE, Event.ALERT): State.SENT,
        (State.CLEARED, Event.ALERT): State.SENT,
    }
    for rank, state in enumerate(ACTIVE):
        for later in ACTIVE[rank + 1 :]:
            table[state, Event(later.value)] = later  # an ack may skip stages, never go back
        table[state, Event.COALESCE] = state
        table[state, Event.CLOSED] = State.CLEARED
        table[state, Event.CANCEL] = State.CLEARED
        table[state, Event.DURESS] = State.CLEARED
    return table


TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = _table()

# What the person sees on entering a state (before the silent rule).
PATTERN_OF: Final[Mapping[State, Pattern]] = {
    State.SENT: Pattern.SENDING,
    State.RECEIVED: Pattern.RECEIVED,
    State.DELIVERED: Pattern.DELIVERED,
    State.ACKNOWLEDGED: Pattern.ACKNOWLEDGED,
    State.DISPATCHED: Pattern.DISPATCHED,
}
# "failed" has none: the incident's own pattern tells the truth again
SMS_PATTERN_OF: Final[Mapping[SmsProgress | None, Pattern]] = {
    "trying": Pattern.SMS_TRYING,
    "sent": Pattern.SMS_SENT,
}


# ---- gestures: one press of the emergency button, from its edge to its release ----------


class Phase(enum.StrEnum):
    """Where one press of the emergency button stands."""

    OPENING = "opening"  # this press opened the incident: its alert is out already
    DURING = "during"  # a press during an incident, judged on release or at a hold length
    LOOKS_CANCELLED = "looks_cancelled"  # held to cancel_hold_s: the cancel pattern shows
    DONE = "done"  # judged: nothing more comes of this press


class Mark(enum.StrEnum):
    """What the button reports, by the hold lengths of `[behaviour]` it has reached."""

    HELD_SHORT = "held_short"  # still down, under long_press_s
    HELD_LONG = "held_long"  # still down, long_press_s or more
    HELD_CANCEL = "held_cancel"  # still down, cancel_hold_s or more
    HELD_DURESS = "held_duress"  # down for duress_hold_s (held or released)
    RELEASED_SHORT = "released_short"
    RELEASED_LONG = "released_long"
    RELEASED_CANCEL = "released_cancel"


class Gesture(enum.StrEnum):
    """What a press means, once the table has judged it."""

    NOTHING = "nothing"
    URGENT = "urgent"  # the incident is urgent (the opening press, held)
    PRESS = "press"  # one more press
    URGENT_PRESS = "urgent_press"  # one more press, urgent
    SHOW_CANCELLED = "show_cancelled"  # the cancel pattern, before the release decides
    CANCEL = "cancel"
    DURESS = "duress"  # looks like a cancel; tells the centre the person is forced


def _gestures() -> dict[tuple[Phase, Mark], tuple[Phase, Gesture]]:
    table: dict[tuple[Phase, Mark], tuple[Phase, Gesture]] = {
        (Phase.OPENING, Mark.HELD_SHORT): (Phase.OPENING, Gesture.NOTHING),
        (Phase.OPENING, Mark.RELEASED_SHORT): (Phase.DONE, Gesture.NOTHING),
        (Phase.DURING, Mark.HELD_SHORT): (Phase.DURING, Gesture.NOTHING),
        (Phase.DURING, Mark.HELD_LONG): (Phase.DURING, Gesture.NOTHING),
        (Phase.DURING, Mark.HELD_CANCEL): (Phase.LOOKS_CANCELLED, Gesture.SHOW_CANCELLED),
        (Phase.DURING, Mark.RELEASED_SHORT): (Phase.DONE, Gesture.PRESS),
        (Phase.DURING, Mark.RELEASED_LONG): (Phase.DONE, Gesture.URGENT_PRESS),
        (Phase.DURING, Mark.RELEASED_CANCEL): (Phase.DONE, Gesture.CANCEL),
        (Phase.LOOKS_CANCELLED, Mark.HELD_CANCEL): (Phase.LOOKS_CANCELLED, Gesture.NOTHING),
        (Phase.LOOKS_CANCELLED, Mark.RELEASED_CANCEL): (Phase.DONE, Gesture.CANCEL),
    }
    # the opening press held long makes its incident urgent, however long it goes on
    for mark in (Mark.HELD_LONG, Mark.HELD_CANCEL, Mark.HELD_DURESS):
        table[Phase.OPENING, mark] = (Phase.DONE, Gesture.URGENT)
    for mark in (Mark.RELEASED_LONG, Mark.RELEASED_CANCEL):
        table[Phase.OPENING, mark] = (Phase.DONE, Gesture.URGENT)
    # duress as soon as the length is reached, whatever was shown before
    for phase in (Phase.DURING, Phase.LOOKS_CANCELLED):
        table[phase, Mark.HELD_DURESS] = (Phase.DONE, Gesture.DURESS)
    return table


# The whole gesture chart (docs/behaviour.md draws it). A hold only grows, so a mark the
# table lacks for a phase (shorter than one already seen) cannot come from a button; if a
# driver sends one anyway, the press changes nothing.
GESTURES: Final[Mapping[tuple[Phase, Mark], tuple[Phase, Gesture]]] = _gestures()


class BehaviourError(DeviceError):
    """Root of this module's errors."""


class IllegalTransition(BehaviourError, RuntimeError):
    def __init__(self, event: Event, state: State) -> None:
        allowed = sorted(e.value for s, e in TRANSITIONS if s == state)
        super().__init__(
            f"event {event.value!r} is not allowed in state {state.value!r} "
            f"(allowed there: {', '.join(allowed) or 'nothing'})"
        )
        self.event = event
        self.state = state


@dataclass(frozen=True, slots=True)
class Send:
    """Keep `body` in the outbox under `message_id`, then publish it."""

    message_id: str
    body: Alert | Cancel
    # also by SMS if the centre has not got it in time (`[sms]`, device/sms.py)
    sms: bool = False


@dataclass(frozen=True, slots=True)
class Show:
    pattern: Pattern


Effect = Send | Show


@dataclass(slots=True)
class Incident:
    alert_id: str
    presses: int = 1
    urgent: bool = False
    # what the centre has been told so far, and the message it may not have yet
    told_presses: int = 1
    told_urgent: bool = False
    in_flight: str | None = None
    message_ids: set[str] = field(default_factory=set)
    # how far the SMS fallback got with one of its messages (device/sms.py)
    sms: SmsProgress | None = None


@dataclass(slots=True)
class Hold:
    """One press of a button, from its edge to its release."""

    phase: Phase  # OPENING: this press opened the incident (or rang the doorbell)
    looks_cancelled: bool = False  # the cancel pattern is showing (until the release)
    incident_id: str | None = None  # the incident a press during one began in
    held_s: float = 0.0  # the longest hold reported so far (as of its last `held` tick)
    # the centre closed the incident while this press (begun during it) was still short:
    # judged, it asks anew (see _after_close)
    crossed: bool = False


class Behaviour:
    """The state machine of one device; see the module docstring for the rules."""

    def __init__(
        self,
        kind: DeviceKind,
        rules: BehaviourSection,
        *,
        silent: bool,
        new_id: Callable[[], str] = new_message_id,
    ) -> None:
        self.kind = kind
        self.bell: Bell = BELL_OF[kind]
        self.rules = rules
        self.silent = silent
        self.link_up = False
        self.state = State.IDLE
        self.incident: Incident | None = None
        self._new_id = new_id
        self._holds: dict[ButtonName, Hold] = {}
        self._last_ring: tuple[str, float] | None = None

    # ---- inputs -------------------------------------------------------------------------

    def on_input(self, event: InputEvent, now: float) -> list[Effect]:
        if event.input == "tamper":
            trigger: Literal["tamper", "tamper_cleared", "power_loss", "power_restored"] = (
                "tamper" if event.kind == "opened" else "tamper_cleared"
            )
            return [self._event_alert(trigger)]
        if event.input == "power":
            return [
                self._event_alert("power_loss" if event.kind == "power_lost" else "power_restored")
            ]
        if event.input == "doorbell" and self.kind == "doorbell":
            return self._doorbell(event, now)
        if event.input == "emergency" or event.input == "doorbell":
            # a doorbell input on a bell that is not a doorbell: wired as a second panic button
            return self._emergency(event, now)
        return []

    def _emergency(self, event: InputEvent, now: float) -> list[Effect]:
        name: ButtonName = "emergency" if event.input == "emergency" else "doorbell"
        if event.kind == "pressed":
            if self.incident is None:
                self._holds[name] = Hold(Phase.OPENING)
                return self.alert(trigger="press", linked_to=self._recent_ring(now))
            self._holds[name] = Hold(Phase.DURING, incident_id=self.incident.alert_id)
            return []
        hold = self._holds.get(name)
        if hold is None:
            return []  # its press came before a restart, or was already judged
        if event.kind == "released":
            del self._holds[name]
        hold.held_s = max(hold.held_s, event.held_for)
        if hold.phase is Phase.DONE:
            return []
        step = GESTURES.get((hold.phase, self._mark(event)))
        if step is None:
            return []  # a hold that got shorter: not from a button (see GESTURES)
        hold.phase, gesture = step
        if self.incident is None:
            # ended while the button was down: by the centre (a close that crossed this
            # press), or by a cancel or duress of the other button
            return self._after_close(gesture, hold)
        return self._gesture(gesture, hold)

    def _after_close(self, gesture: Gesture, hold: Hold) -> list[Effect]:
        """A press of an incident that ended while it was down, judged. Held to duress, the
        duress alert goes out all the same, linked to that incident, showing nothing new:
        the person is forced, whatever the centre did. A press the centre's close crossed
        while it was short, asking for help (a press, or one held long), opens a new
        incident: the person pressed after whatever made the operator close. Anything
        else (a cancel; a press that outlived a cancel or duress of the other button) has
        nothing left to do."""
        if gesture is Gesture.DURESS and hold.incident_id is not None:
            return [self._duress_alert(hold.incident_id)]
        if not hold.crossed or gesture not in (Gesture.PRESS, Gesture.URGENT_PRESS):
            return []
        effects = self.alert(trigger="press")
        if gesture is Gesture.URGENT_PRESS:
            effects += self.more(urgent=True, presses=0)
        return effects

    def _mark(self, event: InputEvent) -> Mark:
        r, held_for = self.rules, event.held_for
        if held_for >= r.duress_hold_s:
            return Mark.HELD_DURESS  # released or not: reaching it is the gesture
        down = event.kind == "held"
        if held_for >= r.cancel_hold_s:
            return Mark.HELD_CANCEL if down else Mark.RELEASED_CANCEL
        if held_for >= r.long_press_s:
            return Mark.HELD_LONG if down else Mark.RELEASED_LONG
        return Mark.HELD_SHORT if down else Mark.RELEASED_SHORT

    def _gesture(self, gesture: Gesture, hold: Hold) -> list[Effect]:
        if gesture is Gesture.URGENT:
            return self.more(urgent=True, presses=0)
        if gesture is Gesture.PRESS:
            return self.more(urgent=False, presses=1)
        if gesture is Gesture.URGENT_PRESS:
            return self.more(urgent=True, presses=1)
        if gesture is Gesture.SHOW_CANCELLED:
            hold.looks_cancelled = True
            return [Show(Pattern.CANCELLED)]
        if gesture is Gesture.CANCEL:
            return self.cancel(already_shown=hold.looks_cancelled)
        if gesture is Gesture.DURESS:
            return self.duress(already_shown=hold.looks_cancelled)
        return []

    def _doorbell(self, event: InputEvent, now: float) -> list[Effect]:
        if event.kind == "pressed":
            ring_id = self._new_id()
            self._last_ring = (ring_id, now)
            self._holds["doorbell"] = Hold(Phase.OPENING)
            body = Alert(bell="doorbell", trigger="doorbell_ring", silent=self.silent)
            return [Send(ring_id, body), Show(Pattern.RING)]
        hold = self._holds.get("doorbell")
        if event.kind == "released":
            self._holds.pop("doorbell", None)
        if hold is None or hold.phase is Phase.DONE or event.held_for < self.rules.long_press_s:
            return []
        hold.phase = Phase.DONE
        if self.incident is not None:
            return self.more(urgent=False, presses=1)
        # the long press is the emergency gesture itself, not a mark of urgency
        return self.alert(trigger="long_press", linked_to=self._recent_ring(now))

    def _recent_ring(self, now: float) -> str | None:
        if self._last_ring is None:
            return None
        ring_id, at = self._last_ring
        return ring_id if now - at <= self.rules.ring_link_s else None

    def _event_alert(
        self, trigger: Literal["tamper", "tamper_cleared", "power_loss", "power_restored"]
    ) -> Send:
        return Send(self._new_id(), Alert(bell=self.bell, trigger=trigger, silent=self.silent))

    # ---- transitions (public so tests and the agent can drive them directly) --------------

    def alert(
        self, *, trigger: Literal["press", "long_press"], linked_to: str | None = None
    ) -> list[Effect]:
        """Open an incident: the first alert goes out at once."""
        self._fire(Event.ALERT)
        alert_id = self._new_id()
        self.incident = Incident(alert_id, message_ids={alert_id}, in_flight=alert_id)
        body = Alert(bell=self.bell, trigger=trigger, silent=self.silent, linked_to=linked_to)
        return [Send(alert_id, body, sms=True), self._show_state()]

    def more(self, *, urgent: bool, presses: int) -> list[Effect]:
        """Fold more presses (and urgency) into the incident; report when nothing is in flight."""
        self._fire(Event.COALESCE)
        incident = self._active()
        incident.presses += presses
        incident.urgent = incident.urgent or urgent
        return self._report(incident)

    def cancel(self, *, already_shown: bool = False) -> list[Effect]:
        self._fire(Event.CANCEL)
        incident = self._end()
        effects: list[Effect] = [Send(self._new_id(), Cancel(alert_id=incident.alert_id))]
        return effects if already_shown else [*effects, Show(Pattern.CANCELLED)]

    def duress(self, *, already_shown: bool = False) -> list[Effect]:
        """Looks exactly like `cancel` here; tells the centre the person is under duress."""
        self._fire(Event.DURESS)
        incident = self._end()
        effects: list[Effect] = [self._duress_alert(incident.alert_id)]
        return effects if already_shown else [*effects, Show(Pattern.CANCELLED)]

    def _duress_alert(self, incident_id: str) -> Send:
        # silent whatever the mode: whoever forced the cancel is standing next to the device
        body = Alert(
            bell=self.bell, trigger="duress", silent=True, urgent=True, linked_to=incident_id
        )
        return Send(self._new_id(), body, sms=True)

    # ---- acks and link --------------------------------------------------------------------

    def on_ack(self, ack: Ack) -> list[Effect]:
        """A verified ack. Acks for other messages, late or repeated ones change nothing."""
        incident = self.incident
        if incident is None or ack.ref not in incident.message_ids:
            return []
        effects: list[Effect] = []
        if ack.stage == "received" and incident.in_flight == ack.ref:
            incident.in_flight = None
            effects += self._report(incident)
        if ack.stage == "closed":
            self._fire(Event.CLOSED)
            self._end()
            for hold in self._holds.values():
                # a press of this incident still short: a new one, judged on its release.
                # One held long already is on its way to a cancel (or is its opening
                # press): it sends nothing more, unless held on to duress.
                if hold.incident_id == incident.alert_id and hold.held_s < self.rules.long_press_s:
                    hold.crossed = True
            return [*effects, Show(Pattern.OFF)]
        if _rank(ack.stage) <= _rank(self.state.value):
            return effects
        self._fire(Event(ack.stage))
        if any(hold.looks_cancelled for hold in self._holds.values()):
            return effects  # a cancel gesture is showing: keep showing exactly that
        return [*effects, self._show_state()]

    def on_sms(self, message_id: str, progress: SmsProgress) -> list[Effect]:
        """The SMS fallback is sending `message_id` ("trying") or has sent it ("sent")."""
        incident = self.incident
        if incident is None or message_id not in incident.message_ids:
            return []  # e.g. a duress alert: it must keep looking like a cancel
        if progress == incident.sms or incident.sms in ("sent", "failed"):
            return []  # progress only moves forward, and "sent" or "failed" is the last word
        incident.sms = progress
        if self.silent:
            return []  # silent mode shows nothing of the second path (see _show_state)
        if self.state not in NOT_DELIVERED:
            return []  # the centre has it already: that is the truth worth showing
        if any(hold.looks_cancelled for hold in self._holds.values()):
            return []  # a cancel gesture is showing: keep showing exactly that
        return [self._show_state()]

    def on_link(self, up: bool) -> list[Effect]:
        self.link_up = up
        if self.incident is not None:
            return []  # during an incident its own pattern matters more
        return [Show(Pattern.OFF if up else Pattern.LINK_DOWN)]

    def set_silent(self, silent: bool) -> None:
        self.silent = silent

    # ---- internals --------------------------------------------------------------------

    def _fire(self, event: Event) -> None:
        target = TRANSITIONS.get((self.state, event))
        if target is None:
            raise IllegalTransition(event, self.state)
        log.log(DECISION, "behaviour: %s --%s--> %s", self.state.value, event.value, target.value)
        self.state = target

    def _active(self) -> Incident:
        assert self.incident is not None  # every state that takes these events has one
        return self.incident

    def _end(self) -> Incident:
        incident = self._active()
        self.incident = None
        return incident

    def _report(self, incident: Incident) -> list[Effect]:
        if incident.in_flight is not None:
            return []  # told once the message in flight is received
        if (incident.presses, incident.urgent) == (incident.told_presses, incident.told_urgent):
            return []
        trigger: Literal["press", "long_press"] = (
            "long_press" if incident.urgent and not incident.told_urgent else "press"
        )
        update_id = self._new_id()
        body = Alert(
            bell=self.bell,
            trigger=trigger,
            silent=self.silent,
            urgent=incident.urgent,
            presses=incident.presses,
            linked_to=incident.alert_id,
        )
        incident.told_presses, incident.told_urgent = incident.presses, incident.urgent
        incident.in_flight = update_id
        incident.message_ids.add(update_id)
        return [Send(update_id, body)]

    def _show_state(self) -> Show:
        incident = self.incident
        # Silent: the discreet LED keeps telling the incident's own stage; a hold-up's
        # attacker must not see anything change when an SMS leaves.
        if (
            incident is not None
            and incident.sms in SMS_PATTERN_OF
            and self.state in NOT_DELIVERED
            and not self.silent
        ):
            return Show(SMS_PATTERN_OF[incident.sms])
        return Show(PATTERN_OF[self.state])


def _rank(stage: str) -> int:
    """Position of an ack stage (or incident state) on the way to `dispatched`; sent is -1."""
    stages: tuple[str, ...] = ACK_STAGES
    return stages.index(stage) if stage in stages else -1
