"""Helpers every test folder shares (importable because tests/conftest.py's folder is on
sys.path): bounded polling, running coroutines for a block, a control-centre receiver."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from ansimi.broker import free_port
from ansimi.mqtt import Session
from console.receiver import EventLog, Receiver
from device.observer import AgentObserver
from gateway.config import Centre
from protocol.messages import Alert, Body

SECRET = "centre-secret-for-tests"
# Generous because two cores are shared by the broker, agents and other test runs; every
# wait is still bounded, and a passing test returns as soon as its condition holds.
WAIT_S = 60.0


def nowhere_centre() -> Centre:
    """A central centre for every district, where nobody listens: for a test gateway whose
    forwarding is not the point (a gateway with no destination refuses to start)."""
    return Centre(name="central", url=f"http://127.0.0.1:{free_port()}/events", secret=SECRET)


async def eventually(
    check: Callable[[], bool], timeout_s: float = WAIT_S, interval_s: float = 0.02
) -> None:
    """Wait until `check()` holds, polling; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def running(*coros: Awaitable[None]) -> AsyncIterator[None]:
    """Run the coroutines as tasks for the block; cancel and await them after it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@contextlib.asynccontextmanager
async def connected(session: Session, timeout_s: float = 5.0) -> AsyncIterator[Session]:
    """`session` running and connected for the block; closed (DISCONNECT sent) after it."""
    async with running(session.run()):
        try:
            await session.wait_connected(timeout_s)
            yield session
        finally:
            await session.close()


@contextlib.asynccontextmanager
async def serving(app: web.Application, host: str = "127.0.0.1") -> AsyncIterator[str]:
    """`app` on a free port of `host` (loopback) for the block; yields its `/events` URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, host, port).start()
    try:
        yield f"http://{host}:{port}/events"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def centre(
    tmp_path: Path, secret: str = SECRET, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[Receiver, str]]:
    """The reference control-centre receiver on a free port; yields it and its URL."""
    receiver = Receiver(secret, EventLog(tmp_path / "centre.db"))
    try:
        async with serving(receiver.app(), host) as url:
            yield receiver, url
    finally:
        receiver.events.close()


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A socket standing in for systemd's NOTIFY_SOCKET: its path and the socket to read
    (non-blocking). In a short folder: AF_UNIX paths are limited to 107 bytes."""
    with (
        tempfile.TemporaryDirectory(prefix="ansimi-nt-") as folder,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(f"{folder}/notify")
        sock.setblocking(False)
        yield f"{folder}/notify", sock


def notified(sock: socket.socket) -> list[bytes]:
    """Every notification waiting on a notify_socket(), without waiting for more."""
    got = []
    with contextlib.suppress(BlockingIOError):
        while True:
            got.append(sock.recv(4096))
    return got


class AlertsSent(AgentObserver):
    """Ids of every alert the agents publish, resends included (the same id again)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def sent(self, body: Body, message_id: str | None, published: asyncio.Future[None]) -> None:
        if isinstance(body, Alert) and message_id is not None:
            self.ids.add(message_id)


# the one centre a gateway.toml needs so that every district has a destination
CENTRAL_TOML = (
    '\n[[centres]]\nname = "central"\nurl = "https://127.0.0.1/events"\n'
    'secret = "centre-secret-for-tests"\n'
)
