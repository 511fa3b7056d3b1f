"""The fault proxy between MQTT clients and a real mosquitto: drop, hold and delay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings
from simulator.proxy import FaultProxy, ProxyError, parse_connect


@contextlib.asynccontextmanager
async def client(
    port: int, client_id: str, version: int = 5
) -> AsyncIterator[tuple[Session, list[tuple[float, Message]]]]:
    got: list[tuple[float, Message]] = []
    session = Session(
        Settings(
            host="127.0.0.1",
            port=port,
            client_id=client_id,
            version=version,  # type: ignore[arg-type]
            backoff_min_s=0.05,
            backoff_max_s=0.2,
            connect_timeout_s=1,
        ),
        lambda m: got.append((time.monotonic(), m)),
    )
    task = asyncio.create_task(session.run())
    try:
        await session.wait_connected(5)
        yield session, got
    finally:
        await session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def proxy(mosquitto: Mosquitto) -> AsyncIterator[FaultProxy]:
    p = FaultProxy(mosquitto.host, mosquitto.port)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def until(check: object, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("version", [5, 311])
async def test_the_proxy_knows_each_connection_by_its_client_id(
    proxy: FaultProxy, mosquitto: Mosquitto, version: int
) -> None:
    async with client(proxy.port, "sim-bell-00001", version) as (session, got):
        await session.subscribe([("t/echo", 1)])
        await session.publish("t/echo", b"hello")
        await until(lambda: len(got) == 1)
        assert proxy.connections == 1


def test_parse_connect_refuses_what_is_not_a_connect() -> None:
    with pytest.raises(ProxyError):
        parse_connect(b"\x30\x02ab")
    with pytest.raises(ProxyError):
        parse_connect(b"\x10\xff\xff\xff\xff\x01")


async def test_drop_resets_and_refuses_until_healed(proxy: FaultProxy) -> None:
    async with client(proxy.port, "sim-bell-00002") as (session, _):
        proxy.drop({"sim-bell-00002"})
        await until(lambda: not session.connected)
        # its reconnect comes and is refused (a wait on that, not a fixed sleep)
        await until(lambda: proxy.refused >= 1)
        assert not session.connected
        proxy.heal({"sim-bell-00002"})
        await until(lambda: session.connected, 15)


async def test_hold_passes_nothing_until_healed_and_delay_adds_latency(
    proxy: FaultProxy, mosquitto: Mosquitto
) -> None:
    async with (
        client(proxy.port, "sim-bell-00003") as (held, _),
        client(mosquitto.port, "observer") as (observer, seen),
    ):
        await observer.subscribe([("t/held", 1)])
        proxy.hold({"sim-bell-00003"})
        held.publish("t/held", b"during the outage")
        # the publish has reached the proxy and is kept there (not a fixed wait)
        await until(lambda: proxy.holding >= 1)
        assert seen == []
        proxy.heal({"sim-bell-00003"})
        await until(lambda: len(seen) == 1)

        proxy.delay({"sim-bell-00003"}, 0.3)
        start = time.monotonic()
        held.publish("t/held", b"slow")
        await until(lambda: len(seen) == 2)
        assert seen[1][0] - start >= 0.3
        proxy.delay({"sim-bell-00003"}, 0)
        start = time.monotonic()
        held.publish("t/held", b"fast")
        await until(lambda: len(seen) == 3)
        assert seen[2][0] - start < 0.3
