"""The slow-client guard on a real aiohttp server, its clock driven by the test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from ansimi_testkit import eventually

from ansimi.httpguard import SlowClientGuard


@dataclass
class Served:
    guard: SlowClientGuard
    runner: web.AppRunner
    port: int
    now: list[float]
    closed: list[str]

    def sweep(self) -> int:
        assert self.runner.server is not None
        return self.guard.sweep(self.runner.server.connections)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    now = [0.0]
    closed: list[str] = []
    guard = SlowClientGuard(10.0, clock=lambda: now[0], on_close=closed.append)

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    app = web.Application(middlewares=[guard.middleware])
    app.router.add_post("/echo", echo)

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Served(guard, runner, int(runner.addresses[0][1]), now, closed)
    await runner.cleanup()


async def is_closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection (a reset, when it left bytes unread, counts)."""
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def open_with(
    served: Served, data: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def test_a_half_sent_head_is_closed_once_overdue_and_not_before(served: Served) -> None:
    reader, writer = await open_with(served, b"GET / HTTP/1.1\r\nHost: x\r\nCook")
    await eventually(
        lambda: served.runner.server is not None and served.runner.server.connections != [], 5
    )
    assert served.sweep() == 0  # first seen now
    served.now[0] += 9.9
    assert served.sweep() == 0
    served.now[0] += 0.2
    assert served.sweep() == 1 and served.closed == ["head"]
    assert await is_closed(reader)
    writer.close()


async def test_a_body_that_stops_coming_is_closed_and_a_whole_one_is_served(served: Served) -> None:
    slow_reader, slow = await open_with(
        served, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345"
    )
    fast_reader, fast = await open_with(
        served, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    answer = await asyncio.wait_for(fast_reader.readuntil(b"hello"), 5)
    assert answer.startswith(b"HTTP/1.1 200")
    await eventually(lambda: len(served.runner.server.connections) == 2, 5)  # type: ignore[union-attr]
    served.now[0] += 10.1
    # the slow body's connection is overdue; the served one has been idle since its answer:
    # closed too, but a kept-alive connection left idle is no slow client to count
    assert served.sweep() == 2 and served.closed == ["body"]
    assert await is_closed(slow_reader)
    slow.close()
    fast.close()


BIG = 16 * 1024 * 1024  # more than loopback's socket buffers hold: the answer waits on the client
TICK = web.AppKey("tick", asyncio.Event)


@pytest.fixture
async def big_and_stream() -> AsyncIterator[Served]:
    """A server with a large answer and an endless event stream, the guard's clock ours."""
    now = [0.0]
    closed: list[str] = []
    guard = SlowClientGuard(10.0, clock=lambda: now[0], on_close=closed.append)
    tick = asyncio.Event()

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * BIG)

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await tick.wait()
            tick.clear()
            await response.write(b"data: tick\n\n")

    app = web.Application(middlewares=[guard.middleware])
    app.router.add_get("/big", big)
    app.router.add_get("/stream", stream)
    app[TICK] = tick
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield Served(guard, runner, int(runner.addresses[0][1]), now, closed)
    await runner.cleanup()


async def test_a_large_answer_read_slowly_is_not_cut_off(big_and_stream: Served) -> None:
    """The client sent all it had to: a slow download is not a slow client's request."""
    served = big_and_stream
    reader, writer = await open_with(served, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    served.now[0] += 30.0  # the client has not read the body for "30 s"
    assert served.sweep() == 0 and served.closed == []
    body = await asyncio.wait_for(reader.readexactly(BIG), 30)
    assert len(body) == BIG
    writer.close()


async def test_an_event_stream_outlives_the_bound(big_and_stream: Served) -> None:
    served = big_and_stream
    reader, writer = await open_with(served, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    for _ in range(3):
        served.now[0] += 60.0
        assert served.sweep() == 0
        served.runner.app[TICK].set()
        assert b"data: tick" in await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
    assert served.closed == []
    writer.close()
