"""Signed gateway-to-device messages (acks, commands, rtc answers, syncs)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from gateway.store import Incoming
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.jws import Signer
from protocol.messages import Ack, AckStage, Body, Command, Message, Rtc, Sync, build_message
from protocol.topics import down_topic

Publish = Callable[[str, bytes], "asyncio.Future[None]"]


class Downlink:
    """Seals and publishes to one device's `down` topics.

    The sequence number is the wall clock in microseconds, forced to grow: devices only
    need it to rise, and unlike a stored counter it stays rising across restarts and
    across several gateway instances acking the same device, with no write per ack.
    """

    def __init__(
        self,
        signer: Signer,
        publish: Publish,
        *,
        clock_ms: Callable[[], int] | None = None,
        batched_writes: Callable[[], AbstractContextManager[None]] | None = None,
    ) -> None:
        self._signer = signer
        self._publish = publish
        self._clock_ms = clock_ms or wall_ms
        self._batched_writes = batched_writes
        self._last_seq = 0

    def batch(self) -> AbstractContextManager[None]:
        """Messages sent inside leave together at its end (the MQTT session's
        `batched_writes`): for the acks of one intake batch."""
        if self._batched_writes is None:
            return contextlib.nullcontext()
        return self._batched_writes()

    def _next_seq(self) -> int:
        self._last_seq = max(self._last_seq + 1, time.time_ns() // 1000)
        return self._last_seq

    def sealed(self, device_id: str, body: Body) -> tuple[Message, str]:
        """A message about `device_id` signed by this gateway, with the next sequence number.

        Also used for events the gateway makes itself (a device went offline): a control
        centre checks them with the gateway's public key, as it checks devices' with theirs.
        """
        message = build_message(body, device=device_id, seq=self._next_seq(), ts=self._clock_ms())
        return message, seal(message, self._signer)

    def event(self, about: str, body: Body, centres: tuple[str, ...]) -> Incoming:
        """An event this gateway makes and signs itself (a bell offline, its SMS path down,
        a failed test, its own disk low), about `about` (a device, or the gateway's own
        id), ready to keep and forward to `centres`: the one way every such event is made."""
        message, token = self.sealed(about, body)
        return Incoming(
            event_id=message.id,
            device_id=about,
            seq=message.seq,
            type=message.type,
            ts_ms=message.ts,
            body_json=message.body.model_dump_json(),
            jws=token,
            centres=centres,
            kept=True,
        )

    def send(self, device_id: str, body: Ack | Command | Rtc | Sync) -> asyncio.Future[None]:
        message, token = self.sealed(device_id, body)
        return self._publish(down_topic(device_id, message.type), token.encode())

    def ack(self, device_id: str, ref: str, stage: AckStage) -> asyncio.Future[None]:
        return self.send(device_id, Ack(ref=ref, stage=stage))
