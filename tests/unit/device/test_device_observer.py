"""The agent's observer hook: what a simulator or a bench counts, without patching the agent."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_device_agent import Clock, sms_agent

from device.behaviour import SmsProgress
from device.hal.ports import InputEvent, Pattern
from device.observer import AgentObserver
from protocol.messages import Ack, AckStage, Alert, Body, build_message


class Recorder(AgentObserver):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []

    def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
        assert isinstance(published, asyncio.Future)
        self.events.append(("sent", type(body).__name__, message_id))

    def acked(self, ref: str, stage: AckStage) -> None:
        self.events.append(("acked", ref, stage))

    def shown(self, pattern: Pattern) -> None:
        self.events.append(("shown", pattern))

    def link_up(self) -> None:
        self.events.append(("link_up",))

    def link_down(self) -> None:
        self.events.append(("link_down",))

    def sms_progress(self, alert_id: str, progress: SmsProgress) -> None:
        self.events.append(("sms", alert_id, progress))


async def test_the_observer_hears_sends_shows_acks_sms_and_the_link(tmp_path: Path) -> None:
    clock, seen = Clock(), Recorder()
    a, _modem = sms_agent(tmp_path, clock, silent=False, observer=seen)
    a.on_input(InputEvent("emergency", "pressed"))
    (alert_id,) = [e.id for e in a.outbox.pending()]
    assert seen.events == [("sent", "Alert", alert_id), ("shown", Pattern.SENDING)]
    seen.events.clear()

    clock.now += 15_000  # not received in time: the SMS fallback goes
    await a.sms.check()
    assert ("sms", alert_id, "trying") in seen.events and ("sms", alert_id, "sent") in seen.events
    seen.events.clear()

    a._on_down(build_message(Ack(ref=alert_id, stage="received"), device="bell-0001", seq=1, ts=1))
    assert seen.events[0] == ("acked", alert_id, "received")
    seen.events.clear()

    a._link_down()
    a._link_up()
    assert [e for e in seen.events if e[0].startswith("link")] == [("link_down",), ("link_up",)]
    a.outbox.close()


async def test_a_failing_observer_costs_the_bell_nothing(tmp_path: Path) -> None:
    class Broken(AgentObserver):
        def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
            raise RuntimeError("a bug in the watcher")

        def shown(self, pattern: Pattern) -> None:
            raise RuntimeError("a bug in the watcher")

    a, _modem = sms_agent(tmp_path, Clock(), silent=False, observer=Broken())
    a.on_input(InputEvent("emergency", "pressed"))
    (entry,) = a.outbox.pending()
    assert entry.type == "alert"
    indicator = a.hardware.indicator
    assert [pattern for pattern, _ in indicator.history] == [Pattern.SENDING]  # type: ignore[attr-defined]
    assert Alert.model_validate_json(entry.body_json).trigger == "press"
    a.outbox.close()
