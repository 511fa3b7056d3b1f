"""Forwarding without a network: routing, the circuit breaker, retries, refusals, acks.

A fake transport stands in for a centre and a fake clock for time, so every rule is
checked with no sleeping; the real HTTPS path is in tests/integration/gateway.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from gw_testkit import NOW, Clock
from pydantic import ValidationError

from ansimi.config import load_config
from ansimi.districts import SEOUL_DISTRICTS, UnknownDistrict, check_district
from gateway.config import Centre, ForwardConfig, GatewayConfig
from gateway.forward import Circuit, CircuitBreaker, Forwarder
from gateway.metrics import Metrics
from gateway.store import Delivery, Device, Incoming, SqliteStore, StoreError
from gateway.transports import DELIVERED, Outcome

ROOT = Path(__file__).resolve().parents[3]
SECRET = "centre-secret-for-tests"


@dataclass
class FakeCentre:
    """Answers each attempt with the next scripted outcome, then with `default`."""

    script: list[Outcome] = field(default_factory=list)
    default: Outcome = DELIVERED
    concurrency: int = 4
    seen: list[str] = field(default_factory=list)

    async def send(self, delivery: Delivery, district: str) -> Outcome:
        self.seen.append(delivery.event_id)
        return self.script.pop(0) if self.script else self.default

    async def aclose(self) -> None:
        pass


@dataclass
class Rig:
    clock: Clock
    store: CountingStore
    metrics: Metrics
    forwarder: Forwarder
    centres: dict[str, FakeCentre]
    first: list[str]

    def keep(self, n: int, *, kind: str = "alert", start: int = 0) -> list[str]:
        items = [
            Incoming(
                event_id=f"ev{start + i:04d}",
                device_id="bell-0001",
                seq=start + i + 1,
                type=kind,
                ts_ms=self.clock.ms,
                body_json=json.dumps({"bell": "emergency", "trigger": "press"}),
                jws="x.y.z",
                centres=tuple(self.centres),
            )
            for i in range(n)
        ]
        self.store.database.accept_batch(items, self.clock.ms)
        return [i.event_id for i in items]

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels or {}) or 0.0


class CountingStore(SqliteStore):
    """Counts group commits of deliveries; can be told to fail them."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.commits = 0
        self.broken = False

    async def delivered_many(self, done: Sequence[tuple[str, str]], now_ms: int) -> list[bool]:
        if self.broken:
            raise StoreError("disk I/O error")
        self.commits += 1
        return await super().delivered_many(done, now_ms)


def rig(*names: str, **forward: float) -> Rig:
    clock = Clock()
    store = CountingStore()
    store.database.add_device(Device("bell-0001", "k", "bell", "mapo"), now_ms=0)
    metrics = Metrics()
    centres = {name: FakeCentre() for name in names}
    first: list[str] = []
    config = ForwardConfig(
        **{  # type: ignore[arg-type]
            "backoff_min_s": 1.0,
            "backoff_max_s": 60.0,
            "breaker_failures": 3,
            "breaker_open_s": 10.0,
            **forward,
        }
    )
    forwarder = Forwarder(
        store,
        [Centre(name=n, url="https://127.0.0.1/events", secret=SECRET) for n in names],
        config,
        metrics,
        district_of=lambda _device: "mapo",
        on_first_delivery=lambda d: first.append(d.event_id),
        clock_ms=clock,
        rng=random.Random(4),
        transports=dict(centres),  # type: ignore[arg-type]
    )
    return Rig(clock, store, metrics, forwarder, centres, first)


# ---- districts and routing ---------------------------------------------------------------


def test_seoul_has_25_districts_and_a_typo_gets_the_nearest_code() -> None:
    assert len(SEOUL_DISTRICTS) == 25
    assert check_district("gangnam") == "gangnam"
    with pytest.raises(UnknownDistrict, match='did you mean "yeongdeungpo"'):
        check_district("yongdeungpo")
    with pytest.raises(UnknownDistrict, match="use a code from"):
        check_district("busan-haeundae")
    with pytest.raises(UnknownDistrict):
        check_district("*")  # only a centre may serve everything


def test_a_centre_with_a_misspelt_district_is_refused_with_a_hint() -> None:
    with pytest.raises(ValidationError, match='unknown district "mappo": did you mean "mapo"'):
        Centre(name="c", url="https://127.0.0.1/", secret=SECRET, districts=["mappo"])


def test_the_routing_example_sends_each_district_to_its_centre_and_central() -> None:
    config = load_config(ROOT / "gateway" / "routing.example.toml", GatewayConfig)
    assert len(config.centres) == 26
    for code in SEOUL_DISTRICTS:
        assert config.centres_for(code) == ("central", code)


# ---- circuit breaker ---------------------------------------------------------------------


def test_breaker_opens_after_failures_in_a_row_and_probes_once_when_rested() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, open_ms=10_000, clock_ms=clock)
    assert breaker.allow() and breaker.state is Circuit.CLOSED
    assert not breaker.failure() and not breaker.failure()
    breaker.success()  # a success in between resets the count
    assert not breaker.failure() and not breaker.failure()
    assert breaker.failure()  # the third in a row opens it
    assert breaker.state is Circuit.OPEN and not breaker.allow()
    assert breaker.retry_in_ms() == 10_000

    clock.ms += 9_999
    assert not breaker.allow()
    clock.ms += 1
    assert breaker.state is Circuit.HALF_OPEN
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time

    assert breaker.failure()  # the probe failed: open again, for a full period
    assert breaker.state is Circuit.OPEN and breaker.retry_in_ms() == 10_000

    clock.ms += 10_000
    assert breaker.allow()
    assert breaker.success()  # the probe got through: closed
    assert breaker.state is Circuit.CLOSED and breaker.allow() and breaker.allow()


# ---- forwarding ----------------------------------------------------------------------------


async def test_each_centre_gets_each_event_and_the_first_yes_acks_once() -> None:
    r = rig("central", "mapo")
    ids = r.keep(3)
    assert await r.forwarder.pump() == 6
    assert sorted(r.centres["central"].seen) == ids == sorted(r.centres["mapo"].seen)
    assert sorted(r.first) == ids  # one `delivered` ack per alert, not per centre
    assert r.store.database.waiting_count() == 0
    assert await r.forwarder.pump() == 0
    assert r.sample("ansimi_forwarded_total", {"centre": "mapo"}) == 3


async def test_a_failed_attempt_waits_its_backoff_and_then_goes_again() -> None:
    r = rig("central")
    r.centres["central"].script = [Outcome("HTTP 503")]
    (event_id,) = r.keep(1)
    assert await r.forwarder.pump() == 1
    (waiting,) = r.store.database.waiting(10)
    assert (waiting.event_id, waiting.attempts, waiting.last_error) == (event_id, 1, "HTTP 503")
    assert NOW + 1_000 <= waiting.next_attempt_ms <= NOW + 2_000  # min 1 s, doubled, jittered
    assert await r.forwarder.pump() == 0  # not due yet
    r.clock.ms = waiting.next_attempt_ms
    assert await r.forwarder.pump() == 1
    assert r.first == [event_id] and r.store.database.waiting_count() == 0
    assert r.sample("ansimi_forward_failures_total", {"centre": "central"}) == 1


async def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    r = rig("central")
    r.centres["central"].script = [Outcome("HTTP 429", retry_after_ms=30_000)]
    r.keep(1)
    await r.forwarder.pump()
    (waiting,) = r.store.database.waiting(10)
    assert waiting.next_attempt_ms == NOW + 30_000


async def test_a_refusal_is_parked_listed_and_counted_not_retried_in_a_loop() -> None:
    r = rig("central")
    refusal = "HTTP 400: delivery's body differs from the signed payload's"
    r.centres["central"].default = Outcome(refusal, permanent=True)
    (event_id,) = r.keep(1)
    assert await r.forwarder.pump() == 1
    for _ in range(3):  # however long we wait, the same bytes are not sent again
        r.clock.ms += 3_600_000
        assert await r.forwarder.pump() == 0
    assert r.centres["central"].seen == [event_id]
    (parked,) = r.store.database.waiting(10, refused=True)
    assert (parked.event_id, parked.attempts, parked.last_error) == (event_id, 1, refusal)
    assert parked.refused_ms == NOW and parked.district == "mapo"
    assert r.store.database.waiting(10, refused=False) == []
    assert r.store.database.waiting_count() == 1  # kept, never dropped
    assert r.sample("ansimi_forward_refused_total", {"centre": "central"}) == 1
    assert r.sample("ansimi_forward_parked", {"centre": "central"}) == 1
    assert r.sample("ansimi_forward_failures_total", {"centre": "central"}) == 0
    # the centre answers, so its circuit stays closed for everything else
    assert r.forwarder.breaker("central").state is Circuit.CLOSED
    r.centres["central"].default = DELIVERED  # someone fixed the centre
    assert r.store.database.retry_refused(r.clock.ms, centre="central") == 1
    assert await r.forwarder.pump() == 1
    assert r.first == [event_id] and r.store.database.waiting_count() == 0


async def test_an_alert_one_centre_refuses_still_reaches_the_others() -> None:
    r = rig("central", "mapo")
    r.centres["central"].default = Outcome("HTTP 400: malformed", permanent=True)
    (event_id,) = r.keep(1)
    assert await r.forwarder.pump() == 2
    assert r.centres["mapo"].seen == [event_id]
    assert r.first == [event_id]  # the bell hears `delivered`
    assert [(w.centre, w.refused_ms) for w in r.store.database.waiting(10)] == [("central", NOW)]
    r.clock.ms += 3_600_000
    assert await r.forwarder.pump() == 0  # neither sent again
    assert r.sample("ansimi_forward_parked", {"centre": "central"}) == 1
    assert r.sample("ansimi_forward_parked", {"centre": "mapo"}) == 0


async def test_a_start_gives_every_parked_delivery_one_more_attempt() -> None:
    r = rig("central")
    r.centres["central"].default = Outcome("HTTP 401: bad signature", permanent=True)
    (event_id,) = r.keep(1)
    await r.forwarder.pump()
    assert r.store.database.waiting(10, refused=True)
    r.centres["central"].default = DELIVERED  # the secret was fixed in the config...
    await r.forwarder.reroute()  # ...and the gateway restarted
    assert await r.forwarder.pump() == 1
    assert r.first == [event_id] and r.store.database.waiting_count() == 0


async def test_an_open_circuit_sends_nothing_and_keeps_every_delivery_in_place() -> None:
    r = rig("central", "mapo")
    down = r.centres["central"]
    down.default = Outcome("ClientConnectorError")
    down.concurrency = 1
    r.keep(10)
    # three failures in a row (one a round, concurrency 1, each retried once due) open it
    for _ in range(3):
        await r.forwarder.pump()
        r.clock.ms += 2_001
    assert r.forwarder.breaker("central").state is Circuit.OPEN
    assert len(down.seen) == 3
    # the other centre is not held back by the one that is down
    r.clock.ms += 60_000
    while await r.forwarder.pump():
        pass
    assert len(r.centres["mapo"].seen) == 10
    assert len(down.seen) == 3 + 1  # rested 10 s: one probe, failed, open again
    assert r.forwarder.breaker("central").state is Circuit.OPEN
    assert r.store.database.waiting_by_centre() == {"central": 10}
    attempts = {w.event_id: w.attempts for w in r.store.database.waiting(100)}
    # the centre comes back: the next probe closes the circuit and everything flows
    down.default = DELIVERED
    r.clock.ms += 120_000
    while await r.forwarder.pump():
        pass
    assert r.forwarder.breaker("central").state is Circuit.CLOSED
    assert r.store.database.waiting_count() == 0
    assert sorted(set(down.seen)) == sorted(attempts)
    # while open, deliveries were not attempted, so their backoff did not grow
    assert sum(attempts.values()) == 4


async def test_a_transport_bug_costs_one_attempt_not_the_delivery() -> None:
    r = rig("central")

    async def broken(delivery: Delivery, district: str) -> Outcome:
        raise RuntimeError("bug")

    r.centres["central"].send = broken  # type: ignore[method-assign]
    r.keep(1)
    assert await r.forwarder.pump() == 1
    (waiting,) = r.store.database.waiting(10)
    assert waiting.last_error == "internal error: RuntimeError"


async def test_deliveries_that_succeed_together_are_recorded_in_one_commit() -> None:
    r = rig("central", "mapo")
    for centre in r.centres.values():
        centre.concurrency = 50
    ids = r.keep(50)
    assert await r.forwarder.pump() == 100
    assert r.store.database.waiting_count() == 0 and sorted(r.first) == ids
    assert 1 <= r.store.commits <= 4  # not one fsync per delivery


async def test_a_success_that_cannot_be_recorded_rests_a_backoff_then_goes_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig("central")
    r.keep(3)
    r.store.broken = True
    assert await r.forwarder.pump() == 3
    assert r.store.database.waiting_count() == 3 and r.first == []
    # still due in the store, but not sent again at once (it was ~500 times a second)
    for _ in range(5):
        assert await r.forwarder.pump() == 0
    assert r.sample("ansimi_forward_unrecorded_total", {"centre": "central"}) == 3
    # one log line for the three that failed together, not one per attempt
    assert len([m for m in caplog.messages if "cannot record" in m]) == 1
    r.clock.ms += 2_001  # the first rest: backoff_min 1 s, doubled, jittered
    r.store.broken = False
    assert await r.forwarder.pump() == 3  # the centre gets them again, drops the repeats
    assert r.store.database.waiting_count() == 0 and len(r.first) == 3


async def test_a_failure_that_cannot_be_recorded_rests_longer_each_time() -> None:
    r = rig("central", breaker_failures=100)  # the circuit is not what this is about
    r.centres["central"].default = Outcome("HTTP 503")
    r.keep(1)

    def broken_failed(event_id: str, centre: str, next_attempt_ms: int, error: str) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    r.store.database.failed = broken_failed  # type: ignore[method-assign]
    assert await r.forwarder.pump() == 1
    rests = []
    for _ in range(6):
        start = r.clock.ms
        for _ in range(1_000):  # bounded: 100 s of the fake clock, past backoff_max
            if await r.forwarder.pump():
                break
            r.clock.ms += 100
        else:
            raise AssertionError("never sent again")
        rests.append(r.clock.ms - start)
    assert all(rest >= 1_000 for rest in rests)  # never again at once
    assert rests[-1] > rests[0]  # exponential, like any failure's backoff
    assert r.sample("ansimi_forward_unrecorded_total", {"centre": "central"}) == 7


async def test_a_failing_centre_says_since_when_until_it_takes_one_again() -> None:
    r = rig("central", "mapo")
    r.centres["central"].script = [Outcome("HTTP 503"), Outcome("ClientConnectorError")]
    r.keep(1)
    start = r.clock.ms
    await r.forwarder.pump()
    assert list(r.forwarder.failing()) == ["central"]
    r.clock.ms += 60_000
    await r.forwarder.pump()
    failing = r.forwarder.failing()["central"]
    assert (failing.since_ms, failing.error) == (start, "ClientConnectorError")
    r.clock.ms += 60_000
    await r.forwarder.pump()
    assert r.forwarder.failing() == {}


async def test_a_centre_is_failing_since_its_first_failed_attempt_began() -> None:
    r = rig("central")

    async def times_out(delivery: Delivery, district: str) -> Outcome:
        r.clock.ms += 5_000  # the request's timeout went by
        return Outcome("TimeoutError")

    r.centres["central"].send = times_out  # type: ignore[method-assign]
    r.keep(1)
    start = r.clock.ms
    await r.forwarder.pump()
    assert r.forwarder.failing()["central"].since_ms == start


@pytest.mark.parametrize(
    ("header", "wait_ms"),
    [("²", 0), ("٣", 0), ("-1", 0), ("+5", 0), ("9" * 40, 0), ("Fri, 04 Dec 2026", 0),
     (None, 0), (" 7 ", 7_000), ("99999", 3_600_000)],
)  # fmt: skip
def test_a_centres_retry_after_is_read_strictly(header: str | None, wait_ms: int) -> None:
    """'²' passes str.isdigit() and then broke int(): a centre's header is never a bug."""
    from gateway.transports.https import _retry_after_ms

    assert _retry_after_ms(header) == wait_ms
