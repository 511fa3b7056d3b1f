"""The asyncio paho session against a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.publish as paho_publish
import pytest
from ansimi_testkit import eventually

from ansimi.broker import Mosquitto, MosquittoConfig
from ansimi.mqtt import LinkDead, Message, Session, Settings, Will
from simulator.proxy import FaultProxy


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
        await eventually(lambda: not sub.connected, 5)
        mosquitto.start()
        await sub.wait_connected(10)
        await pub.wait_connected(10)
        # sub's SUBSCRIBE went out in its CONNACK callback, ahead of this PUBLISH on the
        # same connection: once the broker acks this, it has the subscription
        await asyncio.wait_for(sub.publish("t/resubscribed", b""), 5)
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


async def test_batched_publishes_leave_in_one_write_pass(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway's acks of one batch: one pass through paho's write path (its lock and
    callbacks cost more than the send), and each still reaches its subscriber."""
    inbox = Inbox()
    async with (
        running(Session(settings(mosquitto, "batch-sub"), inbox)) as sub,
        running(Session(settings(mosquitto, "batch-pub"), lambda m: None)) as pub,
    ):
        await sub.subscribe([("t/batch/#", 1)])
        passes = 0
        loop_write = pub._client.loop_write

        def counted() -> Any:
            nonlocal passes
            passes += 1
            return loop_write()

        monkeypatch.setattr(pub._client, "loop_write", counted)
        with pub.batched_writes():
            sent = [pub.publish(f"t/batch/{i}", str(i).encode()) for i in range(20)]
            assert passes == 0  # held until the batch ends
        assert passes == 1
        await asyncio.wait_for(asyncio.gather(*sent), 5)
        got = {(await asyncio.wait_for(inbox.messages.get(), 5)).payload for _ in range(20)}
        assert got == {str(i).encode() for i in range(20)}


async def test_a_write_that_empties_the_queue_costs_no_selector_call(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """paho reports every write that empties its queue; the loop watches the socket for
    writability only when the kernel's buffer was full, so only then is there a watch to
    remove (a gateway paid an epoll call per ack)."""
    async with running(Session(settings(mosquitto, "unwatch"), lambda m: None)) as session:
        loop = asyncio.get_running_loop()
        removed: list[object] = []
        remove_writer = loop.remove_writer

        def counted(fd: Any) -> bool:
            removed.append(fd)
            return remove_writer(fd)

        monkeypatch.setattr(loop, "remove_writer", counted)
        await asyncio.wait_for(
            asyncio.gather(*(session.publish("t/unwatch", b"x") for _ in range(10))), 5
        )
        assert removed == []


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
        # the broker's packets are waiting at the socket (not a fixed wait): none is read
        sock = sub._client.socket()
        await eventually(lambda: bool(select.select([sock], [], [], 0)[0]), 5)
        assert inbox.messages.empty() and not own.done()
        sub.resume_reading()
        got = [(await asyncio.wait_for(inbox.messages.get(), 5)).payload for _ in range(50)]
        assert got == [str(i).encode() for i in range(50)]
        await asyncio.wait_for(own, 5)


# ---- subscriptions come back after a broker restart ------------------------------------


async def publish_from_outside(broker: Mosquitto, topic: str, payload: str) -> None:
    """Publish with paho's own blocking helper, not our Session: an independent client,
    as `mosquitto_pub` would be (mosquitto-clients is not installed in CI)."""
    await asyncio.to_thread(
        paho_publish.single,
        topic,
        payload,
        qos=1,
        hostname=broker.host,
        port=broker.port,
        client_id="outside",
    )


async def saved_after(broker: Mosquitto, wall_s: float) -> None:
    """Wait for an autosave of the broker's persistence file later than `wall_s`."""
    db = broker.config.state_dir / "mosquitto.db"
    await eventually(lambda: db.exists() and db.stat().st_mtime > wall_s, timeout_s=15)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_shared_subscription_delivers_again_after_the_broker_restarts(
    tmp_path: Path, stop: str
) -> None:
    """mosquitto 2.0.11 restores the persistent session (`session_present`) but no longer
    delivers its `$share/...` filter: the session must subscribe again all the same."""
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker", autosave_interval_s=1))
    broker.start()
    inbox = Inbox()
    connects: list[bool] = []
    session = Session(
        settings(broker, "gw-like", backoff_min_s=0.05, backoff_max_s=0.2),
        inbox,
        on_connect=connects.append,
    )
    try:
        async with running(session):
            await session.subscribe([("$share/g/t/shared/#", 1)])
            subscribed_at = time.time()
            await publish_from_outside(broker, "t/shared/before", "1")
            assert (await asyncio.wait_for(inbox.messages.get(), 10)).topic == "t/shared/before"
            await saved_after(broker, subscribed_at)
            if stop == "sigterm":
                broker.stop()
            else:
                broker.kill()
            broker.start()
            await eventually(lambda: len(connects) == 2 and session.connected, timeout_s=15)
            assert connects[1], "the broker kept the session: the case that went deaf"
            await publish_from_outside(broker, "t/shared/after", "2")
            got = await asyncio.wait_for(inbox.messages.get(), 10)
            assert (got.topic, got.payload) == ("t/shared/after", b"2")
    finally:
        broker.stop()


async def test_resubscribe_and_reconnect_on_request(mosquitto: Mosquitto) -> None:
    """What the gateway's intake probe calls when its own probe goes unheard."""
    inbox = Inbox()
    connects: list[bool] = []
    slow = {"backoff_min_s": 5.0, "backoff_max_s": 5.0}  # a backoff would show as a timeout
    session = Session(settings(mosquitto, "asks", **slow), inbox, on_connect=connects.append)
    async with running(session):
        assert await session.resubscribe() == []
        await session.subscribe([("t/asks/a", 1), ("t/asks/b", 0)])
        assert await session.resubscribe() == [1, 0]
        session.reconnect()
        await eventually(lambda: len(connects) == 2 and session.connected, timeout_s=2)
        await publish_from_outside(mosquitto, "t/asks/b", "x")
        assert (await asyncio.wait_for(inbox.messages.get(), 5)).topic == "t/asks/b"


# ---- a dead link found by the press itself -----------------------------------------------


@contextlib.asynccontextmanager
async def proxied(broker: Mosquitto) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(broker.host, broker.port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


def watched_settings(port: int, client_id: str, **kw: object) -> Settings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "client_id": client_id,
        "keepalive_s": 60,  # the press, not the keepalive, must find the dead link
        "ack_timeout_s": 1.0,
        "connect_timeout_s": 1.0,
        "backoff_min_s": 0.05,
        "backoff_max_s": 0.2,
        **kw,
    }
    return Settings(**values)


@dataclass
class ProxiedBell:
    proxy: FaultProxy
    bell: Session
    inbox: Inbox  # what a listener on the broker itself got on t/press
    dead: list[LinkDead]

    def press(self) -> tuple[float, asyncio.Future[None]]:
        """An alert published as urgent: when, and its PUBACK to come."""
        return asyncio.get_running_loop().time(), self.bell.publish(
            "t/press", b"alert", urgent=True
        )


@contextlib.asynccontextmanager
async def bell_behind_a_proxy(
    mosquitto: Mosquitto, client_id: str, **kw: object
) -> AsyncIterator[ProxiedBell]:
    inbox = Inbox()
    async with (
        proxied(mosquitto) as proxy,
        running(Session(settings(mosquitto, "listener"), inbox)) as listener,
        running(Session(watched_settings(proxy.port, client_id, **kw), lambda m: None)) as bell,
    ):
        dead: list[LinkDead] = []
        bell.add_link_dead_listener(dead.append)
        await listener.subscribe([("t/press", 1)])
        yield ProxiedBell(proxy, bell, inbox, dead)


async def test_an_urgent_publish_on_a_black_holed_link_declares_it_dead(
    mosquitto: Mosquitto,
) -> None:
    async with bell_behind_a_proxy(mosquitto, "bell-dead-1") as x:
        x.proxy.hold({"bell-dead-1"})
        pressed_at, delivered = x.press()
        # PUBACK missing for ack_timeout_s, then no PINGRESP for as long again
        await eventually(lambda: bool(x.dead), timeout_s=15)
        assert x.dead[0].reason == "ack_timeout"
        assert x.dead[0].address == f"127.0.0.1:{x.proxy.port}"
        assert x.dead[0].at_s - pressed_at >= 2 * 1.0
        assert x.dead[0].at_s - pressed_at < 2 * 1.0 + 2.0
        assert not delivered.done()
        x.proxy.heal({"bell-dead-1"})
        await asyncio.wait_for(delivered, 15)
        assert (await asyncio.wait_for(x.inbox.messages.get(), 5)).payload == b"alert"


async def test_a_link_that_answers_pings_but_never_takes_the_alert_is_given_up(
    mosquitto: Mosquitto,
) -> None:
    # RabbitMQ 3.10 after a node was killed kept bells' connections, answered their pings
    # and never took their alerts; a new connection's went through (tests/cluster)
    async with bell_behind_a_proxy(mosquitto, "bell-stuck-1", puback_give_up_s=4.0) as x:
        # the next connection is a sound one
        x.bell.add_link_dead_listener(lambda _: x.proxy.heal({"bell-stuck-1"}))
        x.proxy.swallow({"bell-stuck-1"})
        pressed_at, delivered = x.press()
        await eventually(lambda: bool(x.dead), timeout_s=15)
        assert x.dead[0].reason == "puback_stuck"
        assert x.proxy.publishes_swallowed >= 1
        assert x.bell.probes_answered >= 1  # the link looked alive all along
        assert 4.0 <= x.dead[0].at_s - pressed_at < 4.0 + 2.0
        await asyncio.wait_for(delivered, 15)
        assert (await asyncio.wait_for(x.inbox.messages.get(), 5)).payload == b"alert"


def behind_then_direct(
    proxy: FaultProxy, broker: Mosquitto, client_id: str, **kw: object
) -> Settings:
    """Settings for a session that dials `broker` through `proxy` first, then directly."""
    return Settings(
        host="127.0.0.1",
        port=proxy.port,
        client_id=client_id,
        other_addresses=((broker.host, broker.port),),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("version", [5, 311])
async def test_a_session_begun_afresh_drops_what_the_old_one_held_and_persists_again(
    mosquitto: Mosquitto, version: int
) -> None:
    # device/link.py begins afresh when nothing comes down a session any more; the broker
    # must forget that session, and the new one must keep messages for us like the old
    inbox, wills = Inbox(), Inbox()
    present: list[bool] = []
    async with (
        proxied(mosquitto) as proxy,
        running(Session(settings(mosquitto, f"centre-{version}"), wills)) as centre,
    ):
        await centre.subscribe([(f"t/will/{version}", 1)])
        bell = Session(
            behind_then_direct(
                proxy,
                mosquitto,
                f"bell-afresh-{version}",
                version=version,
                will=Will(f"t/will/{version}", b"offline", retain=False),
            ),
            inbox,
            on_connect=present.append,
            subscriptions=[("t/down", 1)],
        )
        async with running(bell):
            await eventually(lambda: present == [False], 5)
            # a message the old session holds and cannot deliver: the proxy holds its link
            proxy.hold({f"bell-afresh-{version}"})
            await asyncio.wait_for(centre.publish("t/down", b"old", qos=1), 5)
            bell.start_afresh()
            await eventually(lambda: bell.connected and len(present) == 2, 10)
            assert bell.address == (mosquitto.host, mosquitto.port)  # the next broker
            assert present == [False, False]  # the old session is gone
            await asyncio.wait_for(centre.publish("t/down", b"new", qos=1), 5)
            got = await asyncio.wait_for(inbox.messages.get(), 5)
            assert got.payload == b"new"  # subscribed again; "old" went with its session
            # the held connection's will, when the proxy lets it go; none from 3.1.1's
            # clean connection, left with a DISCONNECT
            await asyncio.sleep(0.5)
            assert wills.messages.qsize() == 1
            # the new session is kept across a reconnect, like the first
            proxy.heal({f"bell-afresh-{version}"})
            bell.reconnect()
            await eventually(lambda: bell.connected and len(present) == 3, 10)
            assert present[2] is True
            assert inbox.messages.empty()


async def test_a_broker_that_closes_each_connection_at_its_publish_is_left_for_the_next(
    mosquitto: Mosquitto,
) -> None:
    # RabbitMQ 3.10 after a partition: connects accepted, then every publish nacked and the
    # connection closed; the bells came back to the same node 3 times a second
    async with proxied(mosquitto) as proxy:
        proxy.close_on_publish({"bell-closed-1"})
        bell = Session(behind_then_direct(proxy, mosquitto, "bell-closed-1"), lambda m: None)
        async with running(bell):
            await asyncio.wait_for(bell.publish("t/closed", b"alert", urgent=True), 10)
            assert bell.address == (mosquitto.host, mosquitto.port)
            assert bell.failed_connects == 1 and proxy.connections == 1


async def test_a_link_answering_its_probes_stays_up(mosquitto: Mosquitto) -> None:
    dead: list[LinkDead] = []
    async with running(
        Session(watched_settings(mosquitto.port, "bell-alive", keepalive_s=1), lambda m: None)
    ) as bell:
        bell.add_link_dead_listener(dead.append)
        await asyncio.wait_for(bell.publish("t/alive", b"alert", urgent=True), 5)
        # three keepalives: each quiet second is probed, and each probe is answered
        await eventually(lambda: bell.probes_answered >= 3, 10)
        assert dead == [] and bell.connected


async def test_a_quiet_black_holed_link_is_dead_a_keepalive_and_a_bound_later(
    mosquitto: Mosquitto,
) -> None:
    dead: list[LinkDead] = []
    async with (
        proxied(mosquitto) as proxy,
        running(
            Session(watched_settings(proxy.port, "bell-quiet", keepalive_s=2), lambda m: None)
        ) as bell,
    ):
        bell.add_link_dead_listener(dead.append)
        cut_at = asyncio.get_running_loop().time()
        proxy.hold({"bell-quiet"})
        await eventually(lambda: bool(dead), timeout_s=15)
        assert dead[0].reason == "idle"
        # the probe after one keepalive of quiet, unanswered for ack_timeout_s (1 s): within
        # two keepalives (the device's heartbeats), with the loop's slack
        assert dead[0].at_s - cut_at <= 2 + 1 + 0.5


async def test_a_dead_link_moves_to_the_next_broker_address(mosquitto: Mosquitto) -> None:
    connects: list[bool] = []
    dead: list[LinkDead] = []
    async with proxied(mosquitto) as first, proxied(mosquitto) as second:
        bell = Session(
            watched_settings(
                first.port, "bell-moves", other_addresses=(("127.0.0.1", second.port),)
            ),
            lambda m: None,
            on_connect=connects.append,
        )
        async with running(bell):
            bell.add_link_dead_listener(dead.append)
            first.hold({"bell-moves"})
            delivered = bell.publish("t/moves", b"alert", urgent=True)
            # the second address carries it at once; the first is still black-holed
            await asyncio.wait_for(delivered, 15)
            assert [d.address for d in dead] == [f"127.0.0.1:{first.port}"]
            assert bell.address == ("127.0.0.1", second.port)
            assert second.connections == 1


async def test_a_torn_down_socket_logs_no_traceback(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that never answers CONNECT: each attempt's socket is torn down before the
    next; none of it may reach the loop's exception handler (`remove_reader` on a closed
    socket: `ValueError: Invalid file descriptor: -1`)."""
    caplog.set_level(logging.WARNING)
    async with proxied(mosquitto) as proxy:
        proxy.hold({"bell-torn"})
        settings_ = watched_settings(proxy.port, "bell-torn", connect_timeout_s=0.1)
        session = Session(settings_, lambda m: None)
        task = asyncio.create_task(session.run())
        try:
            # every attempt waits 2 x connect_timeout_s for its CONNACK, then starts again
            await eventually(lambda: caplog.text.count("no CONNACK") >= 4, timeout_s=15)
        finally:
            await session.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []
    assert "Invalid file descriptor" not in caplog.text
