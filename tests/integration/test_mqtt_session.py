"""The asyncio paho session against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings


class Inbox:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()

    def __call__(self, message: Message) -> None:
        self.messages.put_nowait(message)


def settings(broker: Mosquitto, client_id: str, **kw: object) -> Settings:
    return Settings(host=broker.host, port=broker.port, client_id=client_id, **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(session: Session):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(session.run())
    try:
        await session.wait_connected(5)
        yield session
    finally:
        await session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_publish_qos1_reaches_subscriber_and_future_completes(mosquitto: Mosquitto) -> None:
    inbox = Inbox()
    async with (
        running(Session(settings(mosquitto, "sub"), inbox)) as sub,
        running(Session(settings(mosquitto, "pub"), lambda m: None)) as pub,
    ):
        granted = await sub.subscribe([("t/session/#", 1)])
        assert granted == [1]
        await asyncio.wait_for(pub.publish("t/session/a", b"hello", qos=1), 5)
        got = await asyncio.wait_for(inbox.messages.get(), 5)
        assert (got.topic, got.payload, got.qos) == ("t/session/a", b"hello", 1)


async def test_many_sessions_share_one_loop_without_threads(mosquitto: Mosquitto) -> None:
    import threading

    before = threading.active_count()
    inbox = Inbox()
    sessions = [Session(settings(mosquitto, f"many-{i}"), inbox) for i in range(50)]
    tasks = [asyncio.create_task(s.run()) for s in sessions]
    try:
        await asyncio.gather(*(s.wait_connected(10) for s in sessions))
        # The executor used for connecting may keep a few idle workers, but never one per client.
        assert threading.active_count() - before < 10
        await sessions[0].subscribe([("t/many", 1)])
        await asyncio.gather(
            *(s.publish("t/many", str(i).encode()) for i, s in enumerate(sessions))
        )
        got = {(await asyncio.wait_for(inbox.messages.get(), 5)).payload for _ in sessions}
        assert got == {str(i).encode() for i in range(50)}
    finally:
        for s in sessions:
            await s.close()
        for t in tasks:
            t.cancel()


async def test_session_reconnects_and_resubscribes_after_broker_restart(
    mosquitto: Mosquitto,
) -> None:
    inbox = Inbox()
    fast = {"backoff_min_s": 0.05, "backoff_max_s": 0.2, "persistent": False}
    async with (
        running(Session(settings(mosquitto, "sub-r", **fast), inbox)) as sub,
        running(Session(settings(mosquitto, "pub-r", **fast), lambda m: None)) as pub,
    ):
        await sub.subscribe([("t/restart", 1)])
        mosquitto.kill()
        await asyncio.sleep(0.3)
        assert not sub.connected
        mosquitto.start()
        await sub.wait_connected(10)
        await pub.wait_connected(10)
        await asyncio.sleep(0.2)  # the resubscribe is sent from the CONNACK callback
        await asyncio.wait_for(pub.publish("t/restart", b"after"), 5)
        got = await asyncio.wait_for(inbox.messages.get(), 5)
        assert got.payload == b"after"


async def test_session_sockets_send_small_packets_at_once(mosquitto: Mosquitto) -> None:
    """TCP_NODELAY: no ack held back ~40 ms by Nagle behind the peer's delayed ACK."""
    import socket

    async with running(Session(settings(mosquitto, "nodelay"), lambda m: None)) as session:
        sock = session._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_a_peer_that_closes_before_connack_is_retried_after_the_backoff() -> None:
    """A listener that accepts and hangs up: the session retries at its backoff, not after
    waiting out the CONNACK timeout each time."""
    accepted = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    session = Session(
        Settings(
            host="127.0.0.1",
            port=port,
            client_id="hang-up",
            connect_timeout_s=5.0,
            backoff_min_s=0.05,
            backoff_max_s=0.1,
        ),
        lambda m: None,
    )
    task = asyncio.create_task(session.run())
    try:
        # With the CONNACK timeout (2 x 5 s) in the way there would be one attempt here.
        async with asyncio.timeout(5):
            while accepted < 3:
                await asyncio.sleep(0.02)
    finally:
        await session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()


async def test_paused_reading_holds_messages_at_the_broker_until_resumed(
    mosquitto: Mosquitto,
) -> None:
    # what the gateway does when its intake falls behind: nothing is read, nothing lost
    inbox, writer_inbox = Inbox(), Inbox()
    async with (
        running(Session(settings(mosquitto, "slow-reader"), inbox)) as sub,
        running(Session(settings(mosquitto, "writer"), writer_inbox)) as pub,
    ):
        await sub.subscribe([("t/paused", 1)])
        await pub.subscribe([("t/other", 1)])
        sub.pause_reading()
        await asyncio.wait_for(
            asyncio.gather(*(pub.publish("t/paused", str(i).encode()) for i in range(50))), 5
        )
        # the paused side still writes (the gateway's acks go out), but the broker's
        # PUBACK for it waits to be read like everything else
        own = sub.publish("t/other", b"x")
        assert (await asyncio.wait_for(writer_inbox.messages.get(), 5)).payload == b"x"
        await asyncio.sleep(0.5)
        assert inbox.messages.empty() and not own.done()
        sub.resume_reading()
        got = [(await asyncio.wait_for(inbox.messages.get(), 5)).payload for _ in range(50)]
        assert got == [str(i).encode() for i in range(50)]
        await asyncio.wait_for(own, 5)
