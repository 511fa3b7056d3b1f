"""Never mute on the bell's side, end to end: real mosquitto, the real gateway, real agents.

A bell whose clock is ten minutes off gets its alert to the centre, flagged with the skew,
and after the gateway's sync its messages are in the window. A bell whose outbox was
deleted (its sequence counter with it) gets its next alert through, across a gateway
restart. The centre records the raw deliveries, so the flag beside the signed payload shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from ansimi_testkit import SECRET, eventually, running, serving
from device_testkit import DEVICE_ID, WAIT_S, Keys, make_agent

from ansimi.broker import Mosquitto
from device.agent import Agent
from device.hal.fakes import FakeInputs
from gateway.config import Centre, GatewayConfig, MqttConfig
from gateway.service import Gateway
from gateway.store import Device
from protocol.clock import wall_ms
from protocol.keys import public_key_to_b64

TEN_MINUTES_MS = 600_000


@contextlib.asynccontextmanager
async def recording_centre() -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
    """A control centre that takes every delivery and keeps its JSON as it came."""
    deliveries: list[dict[str, Any]] = []

    async def take(request: web.Request) -> web.Response:
        deliveries.append(json.loads(await request.read()))
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes([web.post("/events", take)])
    async with serving(app) as url:
        yield deliveries, url


@contextlib.asynccontextmanager
async def gateway(
    tmp_path: Path, broker: Mosquitto, keys: Keys, centre_url: str
) -> AsyncIterator[Gateway]:
    """The real gateway on `tmp_path`'s database; the device registered on first start."""
    config = GatewayConfig(
        id=keys.gateway.kid,
        database=tmp_path / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=broker.host, port=broker.port),
        centres=[Centre(name="central", url=centre_url, secret=SECRET)],
    )
    gw = Gateway(config, signer=keys.gateway)
    if gw.store.database.device(DEVICE_ID) is None:
        public = public_key_to_b64(keys.device.public_key)
        await gw.store.add_device(Device(DEVICE_ID, public, "bell", "mapo", "bell"), now_ms=0)
        await gw.registry.reload()
    async with running(gw.run()):
        await asyncio.wait_for(gw.ready.wait(), WAIT_S)
        yield gw


def press(agent: Agent) -> None:
    inputs = agent.hardware.inputs
    assert isinstance(inputs, FakeInputs)
    inputs.press("emergency")
    inputs.release("emergency")


def of_type(deliveries: list[dict[str, Any]], type_name: str) -> list[dict[str, Any]]:
    return [d for d in deliveries if d["type"] == type_name]


def skewed_count(gw: Gateway) -> float:
    return gw.metrics.registry.get_sample_value("ansimi_clock_skewed_total") or 0.0


async def test_a_bell_ten_minutes_off_is_heard_flagged_and_then_in_the_window(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    keys = Keys.new()
    agent = make_agent(
        tmp_path,
        mosquitto,
        keys,
        clock_ms=lambda: wall_ms() + TEN_MINUTES_MS,
    )
    async with recording_centre() as (deliveries, url), running(agent.run()):
        # connected before the gateway listens: its `online` is not what gets the sync
        await asyncio.wait_for(agent.ready.wait(), WAIT_S)
        async with gateway(tmp_path, mosquitto, keys, url) as gw:
            press(agent)
            await eventually(lambda: len(of_type(deliveries, "alert")) == 1, WAIT_S)
            (first,) = of_type(deliveries, "alert")
            assert abs(first["clock_skew_ms"] - TEN_MINUTES_MS) < 30_000
            # the gateway's sync: the bell now keeps the gateway's time, and says so
            await eventually(lambda: abs(agent.clock_offset_ms + TEN_MINUTES_MS) < 30_000)
            await eventually(lambda: len(of_type(deliveries, "health")) == 1, WAIT_S)
            (health,) = of_type(deliveries, "health")
            assert health["body"]["event"] == "clock_corrected"
            # everything the bell signs from now on is in the window
            skewed = skewed_count(gw)
            press(agent)
            await eventually(lambda: len(of_type(deliveries, "alert")) == 2, WAIT_S)
            second = of_type(deliveries, "alert")[1]
            assert "clock_skew_ms" not in second
            assert second["body"]["presses"] == 2
            assert skewed_count(gw) == skewed
            # the bell is heard: supervision watches it
            assert gw.supervisor.deadline(DEVICE_ID) is not None


@pytest.mark.parametrize("damage", ["deleted", "not a database"])
async def test_a_bell_whose_outbox_was_lost_gets_its_next_alert_through(
    tmp_path: Path, mosquitto: Mosquitto, damage: str
) -> None:
    keys = Keys.new()
    async with recording_centre() as (deliveries, url):
        async with gateway(tmp_path, mosquitto, keys, url):
            first = make_agent(tmp_path, mosquitto, keys)
            # a bell that has been running for months: its counter is far along
            first.outbox.raise_seq(50_000)
            async with running(first.run()):
                await asyncio.wait_for(first.ready.wait(), WAIT_S)
                press(first)
                await eventually(lambda: len(of_type(deliveries, "alert")) == 1, WAIT_S)
                await eventually(lambda: first.outbox.depth() == 0, WAIT_S)
        # the gateway restarts (its high-water mark is on disk) and the bell's outbox is
        # deleted or overwritten: its sequence counter starts again from 1
        for path in (tmp_path / "device").glob("outbox.db*"):
            path.unlink()
        if damage == "not a database":  # overwritten: moved aside at start, and reported
            (tmp_path / "device" / "outbox.db").write_bytes(b"overwritten by mistake\n" * 300)
        async with gateway(tmp_path, mosquitto, keys, url) as gw:
            assert gw.registry.high_water[DEVICE_ID] > 50_000
            second = make_agent(tmp_path, mosquitto, keys)
            assert second.outbox.next_seq() < 10
            async with running(second.run()):
                await asyncio.wait_for(second.ready.wait(), WAIT_S)
                press(second)
                await eventually(lambda: len(of_type(deliveries, "alert")) == 2, WAIT_S)
                await eventually(lambda: second.outbox.depth() == 0, WAIT_S)
            refused = gw.metrics.registry.get_sample_value(
                "ansimi_rejected_total", {"reason": "replay"}
            )
            assert refused is not None and refused >= 1  # refused once, then synced
            if damage == "not a database":
                # the bell said so at start: the centre knows alerts may have been lost
                await eventually(lambda: len(of_type(deliveries, "health")) == 1, WAIT_S)
                (health,) = of_type(deliveries, "health")
                assert (health["body"]["event"], health["body"]["salvaged"]) == (
                    "outbox_recovered",
                    0,
                )
