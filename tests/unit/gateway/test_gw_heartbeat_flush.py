"""Heartbeats kept together every `heartbeat_flush_ms` (gateway/intake.py): liveness may
wait one interval, an alert never does, and a crash loses at most the waiting liveness."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from gw_testkit import ALERT, NOW, Env, heartbeat, make_env

from gateway.store import Accepted, Incoming
from protocol.messages import Status

FLUSH_MS = 1_000


async def flushing_env(**kwargs: int) -> Env:
    return await make_env(heartbeat_flush_ms=FLUSH_MS, **kwargs)


def commits(env: Env) -> list[int]:
    """The size of every group commit the intake makes from now on."""
    sizes: list[int] = []
    accept = env.store.accept_batch

    async def counted(batch: list[Incoming], now_ms: int) -> Accepted:
        sizes.append(len(batch))
        return await accept(batch, now_ms)

    env.store.accept_batch = counted  # type: ignore[method-assign]
    return sizes


def last_seen(env: Env, device: str) -> int | None:
    found = env.store.database.device(device)
    assert found is not None
    return found.last_seen_ms


async def test_heartbeats_arriving_apart_are_kept_in_one_commit() -> None:
    env = await flushing_env()
    sizes = commits(env)
    for device in ("bell-0001", "bell-0002", "bell-0001"):
        await env.feed(env.message(heartbeat(), device=device))
        env.clock.ms += FLUSH_MS // 4
    assert sizes == []
    assert last_seen(env, "bell-0001") is None
    env.clock.ms += FLUSH_MS // 4
    await env.feed(env.message(heartbeat(), device="bell-0002"))
    assert sizes == [4]
    assert last_seen(env, "bell-0001") == last_seen(env, "bell-0002") == env.clock.ms
    device = env.store.database.device("bell-0001")
    assert device is not None and device.high_water == env.seqs["bell-0001"]


async def test_an_alert_is_kept_and_acked_at_once_while_heartbeats_wait() -> None:
    env = await flushing_env()
    beat = env.message(heartbeat(), device="bell-0002")
    alert = env.message(ALERT)
    await env.feed(beat, alert)
    assert env.event_count() == 1
    assert [stage for _, _, stage in env.acks()] == ["received"]
    assert last_seen(env, "bell-0002") is None  # liveness waits, the alert does not


async def test_a_crash_loses_the_waiting_heartbeats_never_an_alert() -> None:
    env = await flushing_env()
    await env.feed(env.message(heartbeat(), device="bell-0002"), env.message(ALERT))
    # the process dies here: a new gateway opens the same store
    restarted = await make_env(env.clock, env.store, heartbeat_flush_ms=FLUSH_MS)
    assert restarted.event_count() == 1
    assert last_seen(restarted, "bell-0001") == NOW
    assert last_seen(restarted, "bell-0002") is None  # one interval of liveness, no more
    # the device's next heartbeat brings it back
    restarted.seqs.update(env.seqs)
    await restarted.feed(restarted.message(heartbeat(), device="bell-0002"))
    await restarted.intake.flush_heartbeats()
    assert last_seen(restarted, "bell-0002") == NOW


async def test_a_will_after_a_waiting_heartbeat_is_not_cancelled_by_it() -> None:
    grace_ms = 5_000
    env = await flushing_env(will_grace_ms=grace_ms)
    await env.feed(env.message(heartbeat()))
    await env.intake.flush_heartbeats()
    env.clock.ms += 100
    await env.feed(env.message(heartbeat()))  # waits
    env.clock.ms += 100
    will_at = env.clock.ms
    await env.feed(env.message(Status(state="offline"), seq=1, ts=NOW - 60_000))
    # the heartbeat was sent before the connection died: the will still takes the device
    # offline after the grace, not at the heartbeat's timeout
    env.clock.ms += FLUSH_MS
    await env.feed()
    await env.intake.flush_heartbeats()
    assert env.supervisor.deadline("bell-0001") == will_at + grace_ms


async def test_the_running_intake_keeps_waiting_heartbeats_when_nothing_else_comes() -> None:
    env = await make_env(heartbeat_flush_ms=50)
    runner = asyncio.create_task(env.intake.run())
    try:
        env.intake.submit(env.message(heartbeat()))
        async with asyncio.timeout(10):
            while last_seen(env, "bell-0001") is None:
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert last_seen(env, "bell-0001") == NOW


async def test_a_stopped_intake_keeps_what_waits() -> None:
    env = await flushing_env()
    runner = asyncio.create_task(env.intake.run())
    env.intake.submit(env.message(heartbeat()))
    async with asyncio.timeout(10):
        while not env.intake._waiting_beats:
            await asyncio.sleep(0.01)
    assert last_seen(env, "bell-0001") is None
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert last_seen(env, "bell-0001") == NOW


async def test_a_stop_during_a_flush_s_commit_does_not_cut_it() -> None:
    """The store's commit is held; the intake is stopped meanwhile. A commit that a
    cancellation reaches before it is done (PostgreSQL's, held here before the SQLite one
    starts) used to roll back, and the interval's liveness was lost on a clean stop."""
    env = await make_env(heartbeat_flush_ms=50)
    accept, entered, release = env.store.accept_batch, asyncio.Event(), asyncio.Event()

    async def held(batch: list[Incoming], now_ms: int) -> Accepted:
        entered.set()
        await release.wait()
        return await accept(batch, now_ms)

    env.store.accept_batch = held  # type: ignore[method-assign]
    runner = asyncio.create_task(env.intake.run())
    env.intake.submit(env.message(heartbeat()))
    async with asyncio.timeout(10):
        await entered.wait()
    runner.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the intake while the commit is held
    release.set()
    await asyncio.gather(runner, return_exceptions=True)
    assert last_seen(env, "bell-0001") == NOW


async def test_waiting_heartbeats_set_one_timer_a_flush_not_one_a_wake_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Heartbeats arrive a few at a time, and each few wake the intake: a timer set and
    cancelled at every wake-up (3.5 us) cost more than the wait itself (0.07 us)."""
    env = await make_env(heartbeat_flush_ms=60_000)
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    runner = asyncio.create_task(env.intake.run())
    try:
        for n in range(1, 6):
            env.intake.submit(env.message(heartbeat()))
            for _ in range(1_000):  # no sleep with a delay: that would be a timer too
                if len(env.intake._waiting_beats) == n:
                    break
                await asyncio.sleep(0)
            assert len(env.intake._waiting_beats) == n  # each woke the intake on its own
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert len(timers) == 1
