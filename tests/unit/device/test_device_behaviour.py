"""The behaviour state machine, driven with explicit events and times: no loop, no sleeps."""

from __future__ import annotations

import itertools

import pytest

from device.behaviour import (
    TRANSITIONS,
    Behaviour,
    DeviceKind,
    Effect,
    Event,
    IllegalTransition,
    Send,
    Show,
    State,
)
from device.config import BehaviourSection
from device.hal.ports import ButtonName, InputEvent, Pattern
from protocol.messages import Ack, AckStage, Alert, Cancel

RULES = BehaviourSection(long_press_s=3, cancel_hold_s=10, duress_hold_s=15, ring_link_s=60)


def machine(kind: DeviceKind = "bell", *, silent: bool = False) -> Behaviour:
    counter = itertools.count(1)
    return Behaviour(kind, RULES, silent=silent, new_id=lambda: f"msg-{next(counter):04d}")


def sends(effects: list[Effect]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


def shows(effects: list[Effect]) -> list[Pattern]:
    return [e.pattern for e in effects if isinstance(e, Show)]


def alerts(effects: list[Effect]) -> list[Alert]:
    return [s.body for s in sends(effects) if isinstance(s.body, Alert)]


def press(b: Behaviour, name: ButtonName = "emergency", now: float = 0.0) -> list[Effect]:
    return b.on_input(InputEvent(name, "pressed"), now)


def hold(
    b: Behaviour, seconds: float, name: ButtonName = "emergency", now: float = 0.0
) -> list[Effect]:
    """Press, `held` ticks every second up to `seconds`, release: as the adapters report."""
    effects = press(b, name, now)
    for tick in range(1, int(seconds) + 1):
        effects += b.on_input(InputEvent(name, "held", float(tick)), now + tick)
    effects += b.on_input(InputEvent(name, "released", seconds), now + seconds)
    return effects


def ack(b: Behaviour, ref: str, stage: AckStage) -> list[Effect]:
    return b.on_ack(Ack(ref=ref, stage=stage))


def test_a_press_sends_an_alert_at_once_and_shows_sending() -> None:
    b = machine()
    effects = press(b)
    (sent,) = sends(effects)
    assert sent.body == Alert(bell="emergency", trigger="press")
    assert sent.sms  # an incident's first alert may go by SMS
    assert shows(effects) == [Pattern.SENDING]
    assert b.state is State.SENT


def test_acks_walk_the_incident_forward_and_show_each_stage() -> None:
    b = machine()
    (sent,) = sends(press(b))
    seen = []
    for stage in ("received", "delivered", "acknowledged", "dispatched"):
        seen += shows(ack(b, sent.message_id, stage))
        assert b.state == State(stage)
    assert seen == [Pattern.RECEIVED, Pattern.DELIVERED, Pattern.ACKNOWLEDGED, Pattern.DISPATCHED]
    assert shows(ack(b, sent.message_id, "closed")) == [Pattern.OFF]
    assert b.state is State.CLEARED and b.incident is None


def test_late_repeated_and_foreign_acks_change_nothing() -> None:
    b = machine()
    (sent,) = sends(press(b))
    ack(b, sent.message_id, "acknowledged")  # skipping stages is fine
    assert b.state is State.ACKNOWLEDGED
    assert ack(b, sent.message_id, "delivered") == []  # late
    assert ack(b, sent.message_id, "acknowledged") == []  # repeated
    assert ack(b, "someone-else", "dispatched") == []
    assert b.state is State.ACKNOWLEDGED


def test_more_presses_coalesce_into_one_incident_and_the_centre_learns_the_count() -> None:
    b = machine()
    (first,) = sends(press(b))
    # three more presses before the gateway has received the first alert: nothing new sent
    for _ in range(3):
        assert sends(hold(b, 0.2)) == []
    assert b.incident is not None and b.incident.presses == 4
    # `received` for the first alert releases one update with the count so far
    (update,) = sends(ack(b, first.message_id, "received"))
    assert update.body == Alert(
        bell="emergency", trigger="press", presses=4, linked_to=first.message_id
    )
    assert not update.sms
    # a fifth press waits for the update's own `received`
    assert sends(hold(b, 0.2)) == []
    (second,) = sends(ack(b, update.message_id, "received"))
    assert isinstance(second.body, Alert) and second.body.presses == 5
    # nothing changed since: the next `received` sends nothing
    assert sends(ack(b, second.message_id, "received")) == []
    assert b.state is State.RECEIVED


def test_a_press_the_centres_close_crossed_opens_a_new_incident() -> None:
    # the simulator's rollout scenario: a press went down 5 ms before the centre's close
    # came, and was released after it; it sent nothing and the person was never heard
    b = machine()
    (first,) = sends(hold(b, 0.1))
    ack(b, first.message_id, "acknowledged")
    assert press(b, now=4.0) == []  # during the incident: judged on release
    ack(b, first.message_id, "closed")
    assert b.incident is None
    effects = b.on_input(InputEvent("emergency", "released", 0.1), 4.1)
    (again,) = sends(effects)
    assert again.body == Alert(bell="emergency", trigger="press")  # a new incident
    assert again.sms and shows(effects) == [Pattern.SENDING]
    assert b.incident is not None and b.incident.alert_id == again.message_id


def test_a_long_press_the_centres_close_crossed_opens_a_new_urgent_incident() -> None:
    b = machine()
    (first,) = sends(hold(b, 0.1))
    press(b, now=4.0)
    ack(b, first.message_id, "closed")
    (again,) = sends(b.on_input(InputEvent("emergency", "released", 4.0), 8.0))
    assert again.body == Alert(bell="emergency", trigger="press")
    # its urgency follows once the new alert is received, as for any incident
    (urgent,) = sends(ack(b, again.message_id, "received"))
    assert urgent.body == Alert(
        bell="emergency", trigger="long_press", urgent=True, linked_to=again.message_id
    )


def test_a_cancel_the_centres_close_crossed_sends_nothing() -> None:
    b = machine()
    (first,) = sends(hold(b, 0.1))
    press(b, now=4.0)
    ack(b, first.message_id, "closed")
    assert sends(hold_on(b, 11.0, since=4.0)) == []
    assert b.incident is None


def test_a_hold_already_long_when_the_centre_closes_sends_nothing() -> None:
    # on its way to a cancel: the person sees the close (the pattern off) and lets go
    b = machine()
    (first,) = sends(hold(b, 0.1))
    press(b, now=4.0)
    ticks(b, range(1, 6), since=4.0)
    ack(b, first.message_id, "closed")
    assert sends(b.on_input(InputEvent("emergency", "released", 7.0), 11.0)) == []
    # nor the opening press, held long after its incident was closed: it was heard
    (second,) = sends(press(b, now=20.0))
    ack(b, second.message_id, "closed")
    assert sends(hold_on(b, 4.0, since=20.0)) == []
    assert b.incident is None


def test_a_press_outliving_a_duress_of_the_other_button_sends_nothing() -> None:
    # a bell's doorbell input wired as a second panic button: tapped while the emergency
    # button is held to duress, let go after it; whoever forced the cancel sees a cancel
    b = machine()
    sends(hold(b, 0.1))
    press(b, now=4.0)
    effects: list[Effect] = []
    for tick in range(1, 16):
        if tick == 15:
            press(b, "doorbell", now=18.8)
        effects += b.on_input(InputEvent("emergency", "held", float(tick)), 4.0 + tick)
    (duress,) = alerts(effects)
    assert duress.trigger == "duress" and b.incident is None
    after = b.on_input(InputEvent("doorbell", "released", 0.3), 19.1)
    assert sends(after) == [] and shows(after) == []


def test_a_duress_the_centres_close_crossed_is_sent_all_the_same() -> None:
    b = machine()
    (first,) = sends(hold(b, 0.1))
    press(b, now=4.0)
    ticks(b, range(1, 6), since=4.0)
    ack(b, first.message_id, "closed")  # the operator closes; the person is forced on
    effects = ticks(b, range(6, 16), since=4.0)
    (duress,) = sends(effects)
    assert duress.body == Alert(
        bell="emergency", trigger="duress", silent=True, urgent=True, linked_to=first.message_id
    )
    assert duress.sms and shows(effects) == []  # the close turned it off: nothing new
    assert sends(b.on_input(InputEvent("emergency", "released", 16.0), 20.0)) == []


def ticks(b: Behaviour, seconds: range, *, since: float) -> list[Effect]:
    """The emergency button's `held` ticks at these seconds of a press down since `since`."""
    effects: list[Effect] = []
    for tick in seconds:
        effects += b.on_input(InputEvent("emergency", "held", float(tick)), since + tick)
    return effects


def hold_on(b: Behaviour, seconds: float, *, since: float) -> list[Effect]:
    """The `held` ticks and the release of a press already down since `since`."""
    effects = ticks(b, range(1, int(seconds) + 1), since=since)
    return effects + b.on_input(InputEvent("emergency", "released", seconds), since + seconds)


def test_holding_the_opening_press_marks_the_incident_urgent() -> None:
    b = machine()
    (first,) = sends(press(b))
    ack(b, first.message_id, "received")
    effects = b.on_input(InputEvent("emergency", "held", 2.0), 2.0)
    assert effects == []
    (update,) = sends(b.on_input(InputEvent("emergency", "held", 3.0), 3.0))
    assert update.body == Alert(
        bell="emergency", trigger="long_press", urgent=True, linked_to=first.message_id
    )
    # holding on and letting go adds nothing: not a second press, not a cancel
    assert sends(b.on_input(InputEvent("emergency", "held", 11.0), 11.0)) == []
    assert sends(b.on_input(InputEvent("emergency", "released", 11.5), 11.5)) == []
    assert b.state is State.RECEIVED


def test_a_long_extra_press_counts_and_marks_urgent() -> None:
    b = machine()
    (first,) = sends(hold(b, 0.1))
    ack(b, first.message_id, "received")
    (update,) = sends(hold(b, 4))
    assert isinstance(update.body, Alert)
    assert (update.body.presses, update.body.urgent) == (2, True)


def test_cancel_gesture_sends_cancel_and_clears() -> None:
    b = machine()
    (first,) = sends(hold(b, 0.1))
    ack(b, first.message_id, "delivered")
    effects = hold(b, 12)
    (cancel,) = sends(effects)
    assert cancel.body == Cancel(alert_id=first.message_id)
    assert shows(effects) == [Pattern.CANCELLED]  # shown once, at 10 s
    assert b.state is State.CLEARED
    # the next press is a new incident
    (again,) = sends(press(b, now=100))
    assert isinstance(again.body, Alert) and again.body.linked_to is None
    assert b.state is State.SENT


def test_duress_looks_exactly_like_cancel_but_tells_the_centre() -> None:
    cancelling, coerced = machine(), machine()
    for b in (cancelling, coerced):
        (first,) = sends(hold(b, 0.1))
        ack(b, first.message_id, "received")
    cancel_effects = hold(cancelling, 12)
    # under duress the person keeps holding past 15 s; an ack arrives meanwhile
    duress_effects = press(coerced)
    for tick in range(1, 16):
        duress_effects += coerced.on_input(InputEvent("emergency", "held", float(tick)), tick)
        if tick == 12:
            duress_effects += ack(coerced, "msg-0001", "delivered")
    duress_effects += coerced.on_input(InputEvent("emergency", "released", 16.0), 16.0)

    assert shows(cancel_effects) == shows(duress_effects) == [Pattern.CANCELLED]
    (duress,) = sends(duress_effects)
    assert duress.body == Alert(
        bell="emergency", trigger="duress", silent=True, urgent=True, linked_to="msg-0001"
    )
    assert duress.sms
    assert coerced.state is cancelling.state is State.CLEARED
    # later acks for the old incident or the duress alert show nothing
    assert ack(coerced, "msg-0001", "dispatched") == []
    assert ack(coerced, duress.message_id, "acknowledged") == []


def test_doorbell_short_press_rings_long_press_is_a_linked_emergency() -> None:
    b = machine("doorbell")
    ring_effects = press(b, "doorbell", now=5)
    (ring,) = sends(ring_effects)
    assert ring.body == Alert(bell="doorbell", trigger="doorbell_ring")
    assert not ring.sms
    assert shows(ring_effects) == [Pattern.RING]
    assert b.state is State.IDLE  # a ring is an event, not an emergency
    b.on_input(InputEvent("doorbell", "held", 1.0), 6)
    assert b.state is State.IDLE
    (emergency,) = sends(b.on_input(InputEvent("doorbell", "held", 3.0), 8))
    assert emergency.body == Alert(bell="doorbell", trigger="long_press", linked_to=ring.message_id)
    assert b.state is State.SENT
    assert sends(b.on_input(InputEvent("doorbell", "released", 3.5), 8.5)) == []


def test_doorbell_emergency_button_links_to_a_recent_ring_only() -> None:
    b = machine("doorbell")
    (ring,) = sends(hold(b, 0.2, "doorbell", now=0))
    assert b.state is State.IDLE
    (linked,) = sends(press(b, "emergency", now=30))
    assert isinstance(linked.body, Alert) and linked.body.linked_to == ring.message_id
    b.cancel()
    later = machine("doorbell")
    sends(hold(later, 0.2, "doorbell", now=0))
    (alone,) = sends(press(later, "emergency", now=61))
    assert isinstance(alone.body, Alert) and alone.body.linked_to is None


def test_store_bell_sends_silent_robbery_alerts_and_shows_silently() -> None:
    b = machine("store", silent=True)
    (sent,) = sends(press(b))
    assert sent.body == Alert(bell="store", trigger="press", silent=True)
    assert b.silent  # the agent shows every pattern with silent=True


def test_tamper_and_power_are_events_of_their_own() -> None:
    b = machine()
    events = [
        InputEvent("tamper", "opened"),
        InputEvent("tamper", "closed"),
        InputEvent("power", "power_lost"),
        InputEvent("power", "power_restored"),
    ]
    triggers = [a.trigger for e in events for a in alerts(b.on_input(e, 0))]
    assert triggers == ["tamper", "tamper_cleared", "power_loss", "power_restored"]
    assert b.state is State.IDLE


def test_link_changes_show_only_outside_an_incident() -> None:
    b = machine()
    assert shows(b.on_link(False)) == [Pattern.LINK_DOWN]
    assert shows(b.on_link(True)) == [Pattern.OFF]
    press(b)
    assert b.on_link(False) == []
    assert not b.link_up and b.state is State.SENT


@pytest.mark.parametrize(
    ("drive", "event", "state"),
    [
        (lambda b: b.cancel(), "cancel", "idle"),
        (lambda b: b.duress(), "duress", "idle"),
        (lambda b: b.more(urgent=False, presses=1), "coalesce", "idle"),
        (lambda b: (press(b), b.alert(trigger="press")), "alert", "sent"),
    ],
)
def test_an_illegal_transition_names_the_event_and_the_state(
    drive: object, event: str, state: str
) -> None:
    b = machine()
    with pytest.raises(IllegalTransition, match=f"event '{event}' .* state '{state}'") as caught:
        drive(b)  # type: ignore[operator]
    assert isinstance(caught.value, RuntimeError)


def test_every_transition_in_the_table_happens_through_inputs_and_acks() -> None:
    """Drive each (state, event) pair of the table by gestures and acks, and check it lands."""
    stages: list[AckStage] = ["received", "delivered", "acknowledged", "dispatched"]
    gestures: dict[Event, object] = {
        Event.CLOSED: lambda b: ack(b, "msg-0001", "closed"),
        Event.CANCEL: lambda b: hold(b, 11),
        Event.DURESS: lambda b: hold(b, 16),
        Event.COALESCE: lambda b: hold(b, 0.1),
        **{Event(s): (lambda b, s=s: ack(b, "msg-0001", s)) for s in stages},
    }
    seen: set[tuple[State, Event]] = set()
    for reached in range(len(stages) + 1):
        for event, drive in gestures.items():
            b = machine()
            hold(b, 0.1)  # idle --alert--> sent; the alert is msg-0001
            seen.add((State.IDLE, Event.ALERT))
            for stage in stages[:reached]:
                ack(b, "msg-0001", stage)
            before = b.state
            if (before, event) not in TRANSITIONS:
                continue  # an ack for a stage already passed: filtered, tested above
            drive(b)  # type: ignore[operator]
            assert b.state is TRANSITIONS[before, event], (before, event)
            seen.add((before, event))
            if b.state is State.CLEARED:
                hold(b, 0.1)
                assert b.state is State.SENT
                seen.add((State.CLEARED, Event.ALERT))
    assert seen == set(TRANSITIONS)


# ---- the SMS fallback's patterns -----------------------------------------------------------


def test_sms_progress_shows_its_own_patterns_until_the_centre_has_the_alert() -> None:
    b = machine()
    (sent,) = sends(press(b))
    assert shows(b.on_sms(sent.message_id, "trying")) == [Pattern.SMS_TRYING]
    assert shows(b.on_sms(sent.message_id, "sent")) == [Pattern.SMS_SENT]
    assert b.on_sms(sent.message_id, "trying") == []  # progress only moves forward
    # the gateway has it now, the centre not yet: still "sent by SMS", the better news
    assert shows(ack(b, sent.message_id, "received")) == [Pattern.SMS_SENT]
    assert shows(ack(b, sent.message_id, "delivered")) == [Pattern.DELIVERED]
    assert b.state is State.DELIVERED


def test_sms_after_delivery_or_for_another_alert_shows_nothing() -> None:
    b = machine()
    (sent,) = sends(press(b))
    ack(b, sent.message_id, "delivered")
    assert b.on_sms(sent.message_id, "sent") == []  # the centre has it: keep showing that
    assert b.on_sms("someone-else", "trying") == []


def test_sms_for_a_duress_alert_keeps_looking_like_a_cancel() -> None:
    b = machine()
    press(b)
    effects = hold(b, 15)
    (duress,) = [s for s in sends(effects) if s.sms]
    assert b.on_sms(duress.message_id, "trying") == []
    assert b.on_sms(duress.message_id, "sent") == []


def test_an_sms_that_could_not_be_sent_gives_the_incident_its_own_pattern_back() -> None:
    b = machine()
    (sent,) = sends(press(b))
    b.on_sms(sent.message_id, "trying")
    assert shows(b.on_sms(sent.message_id, "failed")) == [Pattern.SENDING]
    assert b.on_sms(sent.message_id, "sent") == []  # "failed" is the last word
    assert shows(ack(b, sent.message_id, "received")) == [Pattern.RECEIVED]


def test_in_silent_mode_the_sms_changes_nothing_shown() -> None:
    b = machine("store", silent=True)
    (sent,) = sends(press(b))
    assert b.on_sms(sent.message_id, "trying") == []
    assert b.on_sms(sent.message_id, "sent") == []
    # the incident's own stages, as without an SMS: the discreet LED never goes back
    assert shows(ack(b, sent.message_id, "received")) == [Pattern.RECEIVED]
