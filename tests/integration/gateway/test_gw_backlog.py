"""An intake that falls behind stops reading from the broker, and loses nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from ansimi_testkit import centre, eventually, running
from gw_itkit import WAIT_S, Fleet, gateway_running

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings
from gateway.store import Device
from protocol.clock import wall_ms
from protocol.envelope import open_for_device, seal
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import AckMessage, Alert, build_message
from protocol.topics import down_filter, up_topic

DEVICE = "bell-0200"
FLOOD = 300
QUEUE_MAX = 10


async def test_a_flood_onto_a_slow_store_stays_bounded_and_every_alert_is_acked(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    fleet = Fleet.create(tmp_path, mosquitto, 0)
    key = generate_key()
    fleet.register(Device(DEVICE, public_key_to_b64(key.public_key()), "bell", "mapo"))
    device = Signer(DEVICE, key)
    now = wall_ms()
    alerts = [
        build_message(Alert(bell="emergency", trigger="press"), device=DEVICE, seq=n, ts=now)
        for n in range(1, FLOOD + 1)
    ]
    received: set[str] = set()

    def on_ack(raw: Message) -> None:
        opened = open_for_device(
            raw.payload, {fleet.gateway.kid: fleet.gateway.public_key}.get, DEVICE
        )  # type: ignore[arg-type]
        if isinstance(opened.message, AckMessage) and opened.message.body.stage == "received":
            received.add(opened.message.body.ref)

    async with centre(tmp_path) as (_receiver, url):
        config = fleet.config("gw-a", url)
        intake = config.intake.model_copy(update={"queue_max": QUEUE_MAX, "batch_max": 1})
        async with gateway_running(config.model_copy(update={"intake": intake})) as gateway:
            accept_batch = gateway.store.accept_batch

            def slow_accept_batch(*args: Any, **kwargs: Any) -> Any:
                time.sleep(0.005)  # a disk that takes its time (in the intake's writer thread)
                return accept_batch(*args, **kwargs)

            gateway.store.accept_batch = slow_accept_batch  # type: ignore[method-assign]
            longest = 0
            submit = gateway.intake.submit

            def watched_submit(message: Any) -> None:
                nonlocal longest
                submit(message)
                longest = max(longest, len(gateway.intake._queue))

            gateway.intake.submit = watched_submit  # type: ignore[method-assign]
            session = Session(
                Settings(host=mosquitto.host, port=mosquitto.port, client_id=DEVICE), on_ack
            )
            async with running(session.run()):
                await session.wait_connected(WAIT_S)
                await session.subscribe([(down_filter(DEVICE), 1)])
                topic = up_topic(DEVICE, "alert")
                await asyncio.gather(
                    *(session.publish(topic, seal(a, device).encode()) for a in alerts)
                )
                await eventually(lambda: len(received) == FLOOD)
            assert received == {a.id for a in alerts}  # every one kept and acked
            # read as fast as the broker sends, the whole flood would have queued here;
            # paho may finish the read it is in (a few packets) before the pause holds
            assert longest <= 2 * QUEUE_MAX, longest
            paused = gateway.metrics.registry.get_sample_value("ansimi_intake_paused")
            assert paused == 0.0  # and reading went on once the backlog was done
