"""What an agent tells whoever watches it: the simulator, a benchmark, a test.

An observer is handed to the `Agent` when it is built; the agent calls it at each event,
synchronously, on the event loop, after the event has happened. The base class does
nothing, so an observer overrides only what it counts. An observer sees, it does not steer:
what it raises is logged by the agent and the bell goes on. This replaces patching the
agent's, the link's and the behaviour's methods from outside, which broke silently each
time one of their signatures grew.
"""

from __future__ import annotations

import asyncio

from ansimi.mqtt import LinkDead
from device.behaviour import SmsProgress
from device.hal.ports import Pattern
from protocol.messages import AckStage, Body


class AgentObserver:
    """The events of one agent. Every method is a no-op here."""

    def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
        """`body` was handed to the link (a first send or a resend: the same `message_id`).
        `published` completes when the broker has it (PUBACK), or fails."""

    def acked(self, ref: str, stage: AckStage) -> None:
        """A verified ack from the gateway for message `ref` reached `stage`."""

    def shown(self, pattern: Pattern) -> None:
        """The indicator was told to show `pattern`."""

    def link_up(self) -> None:
        """The link to the broker is up (subscriptions made)."""

    def link_down(self) -> None:
        """The link to the broker was lost, as the agent hears it."""

    def link_dead(self, dead: LinkDead) -> None:
        """The MQTT session declared the link dead (a PUBACK or PINGRESP missing), just
        before the disconnect that `link_down` then reports."""

    def sms_progress(self, alert_id: str, progress: SmsProgress) -> None:
        """The SMS fallback moved for alert `alert_id` (`"sent"`: the modem sent it)."""
