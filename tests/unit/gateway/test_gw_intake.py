"""Intake: each refusal is counted under its reason and costs nothing; duplicates are re-acked."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import pytest
from gw_testkit import ALERT, NOW, TIMEOUT_MS, WINDOW_MS, Env, due, heartbeat

from ansimi.mqtt import Message as MqttMessage
from gateway.store import Accepted, Incoming, SqliteStore, StoreError, StoreFull
from protocol.ids import new_message_id
from protocol.messages import Alert, Cancel, Rtc, Status


async def test_a_good_alert_is_kept_acked_and_routed_to_its_district(env: Env) -> None:
    message = env.message(ALERT, id="alert-000001")
    await env.feed(message)
    (event,) = env.store.database.events(None, 10)
    assert (event.event_id, event.device_id, event.type) == ("alert-000001", "bell-0001", "alert")
    assert env.acks() == [("bell-0001", "alert-000001", "received")]
    assert {d.centre for d in due(env.store, NOW, 10)} == {"central", "mapo"}
    assert env.woken == [1]
    assert env.rejected() == 0


def _oversized(env: Env) -> MqttMessage:
    good = env.message(ALERT)
    return MqttMessage(good.topic, good.payload + b"A" * 17_000, 1)


def _malformed(env: Env) -> MqttMessage:
    return MqttMessage("ansimi/v1/bell-0001/up/alert", b"not a jws at all", 1)


REFUSALS: list[tuple[str, Callable[[Env], MqttMessage]]] = [
    ("unknown_device", lambda env: env.message(ALERT, device="bell-0009")),
    ("revoked", lambda env: env.message(ALERT, device="bell-0003")),
    ("oversized", _oversized),
    ("malformed", _malformed),
    # a valid message from bell-0002, published on bell-0001's topic
    (
        "topic_mismatch",
        lambda env: env.message(ALERT, device="bell-0002", topic_device="bell-0001"),
    ),
    # about bell-0001, but signed by bell-0002 (a registered device speaking for another)
    ("topic_mismatch", lambda env: env.message(ALERT, signed_by="bell-0002")),
    # an alert on the heartbeat topic
    (
        "topic_mismatch",
        lambda env: MqttMessage("ansimi/v1/bell-0001/up/heartbeat", env.message(ALERT).payload, 1),
    ),
    (
        "bad_signature",
        lambda env: MqttMessage(
            env.message(ALERT).topic, env.message(ALERT).payload[:-4] + b"AAAA", 1
        ),
    ),
]


@pytest.mark.parametrize(("reason", "make"), REFUSALS, ids=[r for r, _ in REFUSALS])
async def test_each_refusal_is_counted_by_reason_and_the_intake_carries_on(
    env: Env, reason: str, make: Callable[[Env], MqttMessage]
) -> None:
    bad = make(env)
    await env.feed(bad)
    assert env.rejected(reason) == 1
    assert env.rejected() == 1
    assert env.event_count() == 0
    assert env.acks() == []
    assert env.store.database.waiting_count() == 0
    # still running: the next good message goes through
    good = env.message(ALERT)
    await env.feed(good)
    assert env.event_count() == 1
    assert env.rejected() == 1


async def test_a_replayed_sequence_number_is_refused(env: Env) -> None:
    await env.feed(env.message(ALERT, seq=10))
    await env.feed(env.message(ALERT, seq=10))
    await env.feed(env.message(heartbeat(), seq=9))
    assert env.rejected("replay") == 2
    assert env.event_count() == 1


async def test_the_acks_of_a_batch_leave_together(env: Env) -> None:
    """The acks of one batch are published while the downlink holds its writes, and let
    go once after the last (the MQTT session then writes them in one pass)."""
    batches: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def batched_writes() -> Iterator[None]:
        before = len(env.sent)
        yield
        batches.append((before, len(env.sent)))

    env.downlink._batched_writes = batched_writes
    await env.feed(*(env.message(ALERT, id=f"alert-batch-{i}") for i in range(3)))
    assert len(env.acks()) == 3
    assert batches == [(0, 3)]


async def test_an_exact_duplicate_is_re_acked_and_not_forwarded_again(env: Env) -> None:
    original = env.message(ALERT, id="alert-dup-01")
    await env.feed(original)
    await env.feed(original)  # QoS 1 redelivery: same bytes, same seq
    await env.feed(original, original)  # and twice in one batch
    assert env.event_count() == 1
    assert env.acks() == [("bell-0001", "alert-dup-01", "received")] * 4
    assert len(due(env.store, NOW, 10)) == 2  # central and mapo, once each
    assert env.woken == [1]  # the forwarder was woken for the first copy only
    assert env.rejected() == 0
    assert env.metrics.registry.get_sample_value("ansimi_duplicates_total") == 3


async def test_a_resend_with_a_new_seq_is_re_acked_and_not_forwarded_again(env: Env) -> None:
    await env.feed(env.message(ALERT, id="alert-resend"))
    await env.feed(env.message(ALERT, id="alert-resend"))  # the device's resend: fresh seq
    assert env.event_count() == 1
    assert len(env.acks()) == 2
    assert env.woken == [1]


async def test_another_devices_replay_of_a_known_id_is_not_a_duplicate(env: Env) -> None:
    await env.feed(env.message(ALERT, id="alert-of-0001"))
    await env.feed(env.message(ALERT, device="bell-0002", seq=5))
    await env.feed(
        env.message(Cancel(alert_id="alert-of-0001"), device="bell-0002", seq=5, id="alert-of-0001")
    )
    assert env.rejected("replay") == 1
    assert [a[0] for a in env.acks()] == ["bell-0001", "bell-0002"]


# ---- ids belong to one device (issue 14.2): bell-0001 and bell-0002 have their own keys ----


async def test_a_cancel_of_another_devices_alert_is_refused_and_goes_nowhere(env: Env) -> None:
    await env.feed(env.message(ALERT, id="alert-of-0001"))
    env.woken.clear()
    await env.feed(
        env.message(Cancel(alert_id="alert-of-0001"), device="bell-0002", id="cancel-by-0002")
    )
    assert env.rejected("foreign_ref") == 1
    assert env.store.database.event("cancel-by-0002") is None
    assert [e.event_id for e in env.store.database.events(None, 10, type=None)] == ["alert-of-0001"]
    assert env.acks() == [("bell-0001", "alert-of-0001", "received")]  # nothing for 0002
    assert env.woken == []  # nothing to forward
    # the owner's own cancel is kept, acked and forwarded
    await env.feed(env.message(Cancel(alert_id="alert-of-0001"), id="cancel-by-0001"))
    assert env.acks()[-1] == ("bell-0001", "cancel-by-0001", "received")
    assert env.woken == [1]


async def test_an_alert_linked_to_another_devices_event_is_refused(env: Env) -> None:
    await env.feed(env.message(ALERT, id="alert-of-0001"))
    linked = Alert(bell="emergency", trigger="duress", linked_to="alert-of-0001")
    await env.feed(env.message(linked, device="bell-0002", id="duress-by-0002"))
    assert env.rejected("foreign_ref") == 1
    assert env.store.database.event("duress-by-0002") is None
    assert [a[0] for a in env.acks()] == ["bell-0001"]
    # linked to an id no event has yet: nobody's, so it is kept
    await env.feed(
        env.message(linked.model_copy(update={"linked_to": "not-seen-yet"}), "bell-0002")
    )
    assert [a[0] for a in env.acks()] == ["bell-0001", "bell-0002"]


async def test_a_fresh_alert_reusing_another_devices_id_gets_no_ack(env: Env) -> None:
    await env.feed(env.message(ALERT, id="alert-of-0001"))
    # a fresh sequence number, so not a replay: only the id says it is someone else's
    await env.feed(env.message(ALERT, device="bell-0002", id="alert-of-0001"))
    assert env.rejected("foreign_id") == 1
    assert env.acks() == [("bell-0001", "alert-of-0001", "received")]
    event = env.store.database.event("alert-of-0001")
    assert event is not None and event.device_id == "bell-0001"
    assert env.metrics.registry.get_sample_value("ansimi_duplicates_total") == 0
    # in one batch with the owner's alert, the first one keeps the id
    await env.feed(
        env.message(ALERT, id="alert-race-01"),
        env.message(ALERT, device="bell-0002", id="alert-race-01"),
    )
    assert env.rejected("foreign_id") == 2
    assert env.acks()[-1] == ("bell-0001", "alert-race-01", "received")


async def test_an_id_named_before_its_alert_arrived_stays_the_naming_devices(env: Env) -> None:
    # bell-0001's cancel overtakes its alert (the alert is resent later, out of order)
    early = Cancel(alert_id="alert-late-0001")
    await env.feed(env.message(early, id="cancel-early-1"))
    assert env.acks() == [("bell-0001", "cancel-early-1", "received")]
    # meanwhile bell-0002 sends a fresh alert under that id, and links a duress to it
    await env.feed(env.message(ALERT, device="bell-0002", id="alert-late-0001"))
    assert env.rejected("foreign_id") == 1
    linked = Alert(bell="emergency", trigger="duress", linked_to="alert-late-0001")
    await env.feed(env.message(linked, device="bell-0002", id="duress-by-0002"))
    assert env.rejected("foreign_ref") == 1
    assert [a[0] for a in env.acks()] == ["bell-0001"]  # nothing acked to bell-0002
    assert env.store.database.event("alert-late-0001") is None
    # the alert the cancel named arrives: it is bell-0001's, kept and acked
    await env.feed(env.message(ALERT, id="alert-late-0001"))
    event = env.store.database.event("alert-late-0001")
    assert event is not None and event.device_id == "bell-0001"
    assert env.acks()[-1] == ("bell-0001", "alert-late-0001", "received")


async def test_a_message_that_breaks_the_store_costs_only_itself(env: Env) -> None:
    poison = env.message(ALERT, id="poisoned-01")
    good = env.message(ALERT, id="healthy-001")

    class Fragile(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            if any(i.event_id == "poisoned-01" for i in batch):
                raise StoreError("disk trouble")
            return await super().accept_batch(batch, now_ms)

    env.store.__class__ = Fragile
    await env.feed(poison, good)
    assert [e.event_id for e in env.store.database.events(None, 10)] == ["healthy-001"]
    assert env.acks() == [("bell-0001", "healthy-001", "received")]
    assert env.rejected("internal") == 1
    assert env.metrics.registry.get_sample_value("ansimi_store_errors_total") == 1


async def test_a_bug_in_a_check_costs_one_message(env: Env) -> None:
    def broken(kid: str) -> object:
        raise RuntimeError("bug")

    env.registry.resolve = broken  # type: ignore[assignment,method-assign]
    await env.feed(env.message(ALERT))
    assert env.rejected("internal") == 1
    assert env.event_count() == 0


async def test_revocation_takes_effect_at_the_next_message(env: Env) -> None:
    await env.feed(env.message(ALERT))
    await env.store.revoke("bell-0001", 0)
    await env.registry.reload()
    await env.feed(env.message(ALERT))
    assert env.rejected("revoked") == 1
    assert env.event_count() == 1


# ---- the last will (status offline) --------------------------------------------------------


async def _online(env: Env, device: str = "bell-0001") -> None:
    await env.feed(env.message(heartbeat(), device=device))
    assert env.store.database.device(device).online  # type: ignore[union-attr]


async def test_the_last_will_is_accepted_though_its_seq_and_time_are_old(env: Env) -> None:
    # signed at CONNECT an hour ago with seq 1; many messages have gone out since
    will = env.message(Status(state="offline"), seq=1, ts=NOW - 3_600_000)
    env.seqs["bell-0001"] = 50
    await _online(env)
    high_water = env.registry.high_water["bell-0001"]
    await env.feed(will)
    assert env.rejected() == 0
    device = env.store.database.device("bell-0001")
    assert device is not None and device.online is False
    assert env.registry.high_water["bell-0001"] == high_water == device.high_water
    (event,) = env.store.database.events(None, 10)
    assert (event.type, event.body_json) == ("status", '{"state":"offline"}')
    # the same will again (the next unclean disconnect of the same run) is fine
    await _online(env)
    await env.feed(will)
    assert env.rejected() == 0


async def test_a_retained_or_future_will_is_refused(env: Env) -> None:
    await _online(env)
    await env.feed(env.message(Status(state="offline"), seq=1, retain=True))
    await env.feed(env.message(Status(state="offline"), seq=1, ts=NOW + WINDOW_MS + 1))
    assert env.rejected("stale") == 2
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]


async def test_a_will_from_an_earlier_run_is_refused_after_a_later_one(env: Env) -> None:
    old_run = env.message(Status(state="offline"), seq=3, ts=NOW - 100_000)
    new_run = env.message(Status(state="offline"), seq=40, ts=NOW - 50_000)
    await _online(env)
    await env.feed(new_run)
    await _online(env)
    await env.feed(old_run)
    assert env.rejected("replay") == 1
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]


async def test_a_will_followed_by_news_in_the_same_batch_is_out_of_date(env: Env) -> None:
    await _online(env)
    will = env.message(Status(state="offline"), seq=1)
    await env.feed(will, env.message(Status(state="online")))
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]
    assert env.event_count() == 0


async def test_a_forged_will_is_refused(env: Env) -> None:
    await _online(env)
    await env.feed(env.message(Status(state="offline"), seq=1, signed_by="bell-0002"))
    assert env.rejected("topic_mismatch") == 1
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]


async def test_resends_are_looked_up_off_the_event_loop(env: Env) -> None:
    """The store's lock may be held by a commit (an fsync): the loop must not wait."""
    import threading

    original = env.message(ALERT, id="alert-thread")
    await env.feed(original)
    threads: list[str] = []
    lookup = env.store.database.event

    def spy(event_id: str) -> object:
        threads.append(threading.current_thread().name)
        return lookup(event_id)

    env.store.database.event = spy  # type: ignore[method-assign,assignment]
    await env.feed(original, env.message(ALERT, seq=1))  # a resend and a replay
    # looked up on the store's own thread, never on the loop's
    assert threads and all(name.startswith("store") for name in threads)
    assert env.rejected("replay") == 1
    assert len(env.acks()) == 2


async def test_a_flood_of_refusals_is_counted_in_full_and_logged_sparingly(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    junk = MqttMessage("ansimi/v1/bell-0002/up/alert", b"junk", 1)
    await env.feed(*[junk] * 100)
    assert env.rejected("malformed") == 100
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == ["intake: refused a message from bell-0002: malformed"]
    env.clock.ms += 60_000
    await env.feed(junk)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals[-1].endswith("malformed (and 99 more since the last report)")


async def test_the_registry_follows_another_instances_revocation(env: Env) -> None:
    import asyncio

    key_before = env.registry.resolve("bell-0001")
    await env.store.revoke("bell-0001", 0)  # done through another gateway instance's API
    assert not env.registry.device("bell-0001").revoked  # type: ignore[union-attr]
    watch = asyncio.create_task(env.registry.watch(0))
    try:
        async with asyncio.timeout(10):
            while not env.registry.device("bell-0001").revoked:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
    finally:
        watch.cancel()
    await env.feed(env.message(ALERT))
    assert env.rejected("revoked") == 1
    assert env.registry.resolve("bell-0001") is key_before  # keys are not parsed again


async def test_a_failing_supervision_step_does_not_stop_intake(env: Env) -> None:
    await _online(env)

    class Full(SqliteStore):
        async def mark_offline(self, items: Sequence[Incoming], since: int, now: int) -> list[bool]:
            raise StoreFull("disk full")

    env.store.__class__ = Full
    await env.feed(env.message(Status(state="offline"), seq=1))  # raises nothing
    await env.feed(env.message(ALERT, id="after-failure"))
    assert env.acks()[-1] == ("bell-0001", "after-failure", "received")


async def test_a_heartbeat_the_store_cannot_keep_still_proves_the_bell_alive(env: Env) -> None:
    """A full disk fails the commit, not the bell: supervision must not later report as
    offline every bell whose heartbeats the gateway itself could not write."""
    await _online(env)
    first_deadline = env.supervisor.deadline("bell-0001")
    assert first_deadline is not None

    class Full(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            raise StoreFull("database or disk is full")

    env.store.__class__ = Full
    env.clock.ms += TIMEOUT_MS - 1_000
    await env.feed(env.message(heartbeat()))
    # not kept (nothing written), but heard: a full timeout from now
    assert env.supervisor.deadline("bell-0001") == env.clock.ms + TIMEOUT_MS
    env.store.__class__ = SqliteStore
    env.clock.ms += 2_000  # past the first deadline
    assert await env.supervisor.tick(env.clock.ms) == []
    assert env.store.database.device("bell-0001").online  # type: ignore[union-attr]


async def test_a_full_store_costs_one_log_line_not_one_traceback_per_message(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole store cannot write: trying each message alone fails alike; each batch is
    counted in full under the reason and logged at most once an interval."""
    tried: list[int] = []

    class Full(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            tried.append(len(batch))
            raise StoreFull("database or disk is full")

    env.store.__class__ = Full
    for _ in range(3):
        await env.feed(*(env.message(ALERT) for _ in range(4)))
    assert tried == [4, 4, 4]  # never one by one
    assert env.rejected("store_full") == 12
    assert env.acks() == []  # nothing kept, nothing acked: the bells send again
    lines = [r for r in caplog.records if "cannot keep" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


async def test_the_store_keeping_nothing_is_known_from_the_first_failure_or_hang(
    env: Env,
) -> None:
    """/healthz's store path: since when the store kept nothing, failing or hanging."""
    import asyncio

    assert env.intake.store_stuck_since_ms() is None
    full = True

    class Sometimes(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            if full:
                raise StoreFull("database or disk is full")
            return await super().accept_batch(batch, now_ms)

    env.store.__class__ = Sometimes
    failed_at = env.clock.ms
    await env.feed(env.message(ALERT))
    env.clock.ms += 3_000
    await env.feed(env.message(ALERT))
    assert env.intake.store_stuck_since_ms() == failed_at  # from the first, not the last
    full = False
    await env.feed(env.message(ALERT))
    assert env.intake.store_stuck_since_ms() is None
    # a commit that does not come back counts from when it began
    gate = asyncio.Event()

    class Hanging(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            await gate.wait()
            return await super().accept_batch(batch, now_ms)

    env.store.__class__ = Hanging
    began = env.clock.ms
    feeding = asyncio.create_task(env.feed(env.message(ALERT)))
    await asyncio.sleep(0)
    env.clock.ms += 10_000
    assert env.intake.store_stuck_since_ms() == began
    gate.set()
    await feeding
    assert env.intake.store_stuck_since_ms() is None


async def test_the_backlog_shows_in_a_metric(env: Env) -> None:
    import asyncio

    seen: list[float] = []
    process = env.intake.process

    async def spy(batch: list[MqttMessage]) -> None:
        seen.append(env.metrics.registry.get_sample_value("ansimi_intake_queue") or 0.0)
        await process(batch)

    env.intake.process = spy  # type: ignore[method-assign]
    env.intake._batch_max = 2
    for _ in range(5):
        env.intake.submit(env.message(heartbeat()))
    runner = asyncio.create_task(env.intake.run())
    try:
        async with asyncio.timeout(10):
            while len(seen) < 3 or env.metrics.registry.get_sample_value("ansimi_intake_queue"):
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert seen == [3.0, 1.0, 0.0]


async def test_a_backlog_pauses_reading_until_half_of_it_is_done(env: Env) -> None:
    import asyncio

    calls: list[tuple[bool, int]] = []  # (behind, messages waiting then)
    env.intake._on_backlog = lambda behind: calls.append((behind, len(env.intake._queue)))
    env.intake._queue_max, env.intake._batch_max = 6, 2
    for _ in range(5):
        env.intake.submit(env.message(ALERT))
    assert calls == []  # under the limit: nothing to say
    env.intake.submit(env.message(ALERT))
    assert calls == [(True, 6)]
    assert env.metrics.registry.get_sample_value("ansimi_intake_paused") == 1.0
    runner = asyncio.create_task(env.intake.run())
    try:
        async with asyncio.timeout(10):
            while len(env.acks()) < 6:
                await asyncio.sleep(0.01)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    # resumed once half was left (6 -> 4 -> 2 after two batches of two), not before
    assert calls == [(True, 6), (False, 2)]
    assert env.metrics.registry.get_sample_value("ansimi_intake_paused") == 0.0
    assert [stage for _, _, stage in env.acks()] == ["received"] * 6  # nothing lost


async def test_a_batch_another_instance_conflicted_with_is_kept_now(env: Env) -> None:
    """PostgreSQL aborting a batch for another instance's transaction (a deadlock on a
    district outage's incident, say) is not the store down: the alerts are kept and acked
    now, not left for their bells to send again seconds later."""
    asyncpg = pytest.importorskip("asyncpg")
    from gateway.store_pg import pg_error

    conflicts = [pg_error(asyncpg.DeadlockDetectedError("deadlock detected"), "accept_batch")]

    class Conflicted(SqliteStore):
        async def accept_batch(self, batch: Sequence[Incoming], now_ms: int) -> Accepted:
            if conflicts:
                raise conflicts.pop()  # type: ignore[misc]
            return await super().accept_batch(batch, now_ms)

    env.store.__class__ = Conflicted
    await env.feed(env.message(ALERT, id="alert-000001"), env.message(ALERT, id="alert-000002"))
    assert sorted(env.acks()) == [
        ("bell-0001", "alert-000001", "received"),
        ("bell-0001", "alert-000002", "received"),
    ]


def _broken(*_told: object) -> None:
    raise RuntimeError("a consumer's bug")


async def test_a_consumer_that_fails_costs_its_own_view_never_the_intake(env: Env) -> None:
    """Fleet health, remote config, rollouts, video: each told what was kept. One that raises
    used to end the intake's task (every bell deaf), and an rtc consumer that raised skipped
    the acks of the messages after the rtc in the same batch."""
    intake = env.intake_with(on_rtc=_broken, on_heartbeats=_broken, on_kept=_broken)
    rtc = env.message(Rtc(kind="bye", session="s" * 16), device="bell-0002")
    after_rtc, later = new_message_id(), new_message_id()
    batch = [rtc, env.message(ALERT, device="bell-0002", id=after_rtc), env.message(heartbeat())]
    await intake.process(batch)
    await intake.flush_heartbeats()
    assert ("bell-0002", after_rtc, "received") in env.acks()
    # the intake goes on: the next batch is kept and acked too
    await intake.process([env.message(ALERT, id=later)])
    assert ("bell-0001", later, "received") in env.acks()
    failures = {
        consumer: env.metrics.registry.get_sample_value(
            "ansimi_intake_consumer_failures_total", {"consumer": consumer}
        )
        for consumer in ("rtc", "heartbeats", "kept")
    }
    assert failures == {"rtc": 1.0, "heartbeats": 1.0, "kept": 2.0}
