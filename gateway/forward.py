"""Forwarding: every kept event goes to its control centres, until each has said yes.

The outbox lives in the store, so a restart resumes where it stopped. A delivery to an
HTTPS centre is a POST of JSON carrying the device's original JWS, an `Idempotency-Key`
(the event id, so a centre can drop our retries) and an HMAC-SHA256 of the body with the
centre's secret; an SIA DC-09 alarm receiver is one more kind of centre (`gateway.sia`).

Each centre has its own worker, concurrency limit and circuit breaker, so a centre that is
down neither crowds the outbox query nor slows the others. Failures back off
exponentially with full jitter; while a centre's circuit is open nothing is sent to it and
its deliveries keep their place (their attempt counts do not grow), and when one probe
succeeds everything that waited flows again.

Nothing is ever dropped, and nothing loops unseen: a delivery a centre refuses outright
(HTTP 4xx other than 408 and 429: malformed, not authorised; SIA DUH) is parked as
refused, with the centre's reason, logged once as an error, counted
(`ansimi_forward_refused_total`, `ansimi_forward_parked`) and listed by the API
(`GET /deliveries?state=refused`). Sending the same bytes again would get the same answer,
so it is not retried on a timer; a human fixes the cause (a secret, a URL, the centre's
registry) and then `POST /admin/deliveries/retry`, or restarts the gateway after a config
change: every start gives each parked delivery one more attempt. Meanwhile the bell sees no
`delivered` and takes its fallback path (SMS).

At start, every event no centre has accepted yet is routed again with the routing of the
config in force, so an alert kept while its district had no centre (or a centre since
renamed) is delivered as soon as a route exists.

An outcome that cannot be recorded (the disk full, the database locked) is a failure too:
the delivery stays due in the store, so the centre's worker rests for a backoff before it
looks again, or it would resend the same alert as fast as the loop turns. Such a rest is
counted per attempt and logged once per rest.

Health: a centre failing (unreachable, or refusing) since its last success is reported by
`failing()`, with since when and why; the gateway's health (gateway/health.py) shows one
failing longer than its bound as degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiohttp
from prometheus_client import Counter, Gauge

from gateway.config import Centre, ForwardConfig, SiaReceiver, routes_for
from gateway.metrics import Metrics
from gateway.store import Delivery, ForwardStore
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_signature,
    signed_body,
)
from protocol.numbers import Malformed, parse_whole

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], int]

# 4xx answers that mean "not now" rather than "never like this"
TRANSIENT_4XX = frozenset({408, 429})
# characters of a centre's refusal kept as the reason
REASON_MAX = 200


def delivery_body(
    delivery: Delivery, district: str, address: dict[str, str] | None = None
) -> bytes:
    data: dict[str, object] = {
        "event_id": delivery.event_id,
        "device_id": delivery.device_id,
        "district": district,
        "type": delivery.type,
        "ts_ms": delivery.ts_ms,
        # as the device signed it: our model would fill in defaults it left out
        "body": signed_body(delivery.jws),
        "jws": delivery.jws,
    }
    if delivery.clock_skew_ms is not None:
        # the device's clock was this far off ours: metadata beside the signed payload,
        # which stays exactly what the device signed (protocol.replay, rule 2)
        data["clock_skew_ms"] = delivery.clock_skew_ms
    if delivery.incident is not None:
        # the incident it belongs to, as now (docs/incidents.md): beside the signed payload
        data["incident_id"], data["kind"], data["priority"] = delivery.incident
    if address is not None:
        # personal data: only for centres configured with send_address (gateway/private.py)
        data["address"] = address
    return json.dumps(data, separators=(",", ":")).encode()


AddressOf = Callable[[str], Awaitable[dict[str, str] | None]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt came to."""

    error: str | None = None  # None: the centre has it
    # the centre answered and refused this request: retrying soon would not help
    permanent: bool = False
    # the centre asked us to wait at least this long (Retry-After)
    retry_after_ms: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


DELIVERED = Outcome()


class Transport(Protocol):
    """One centre's way of taking a delivery: HTTPS, SIA DC-09, or a test's fake."""

    concurrency: int

    async def send(self, delivery: Delivery, district: str) -> Outcome: ...
    async def aclose(self) -> None: ...


class HttpsCentre:
    """POSTs to one centre's endpoint over its own connection pool and TLS settings."""

    def __init__(
        self,
        centre: Centre,
        config: ForwardConfig,
        clock_ms: Clock,
        address_of: AddressOf | None = None,
    ) -> None:
        self.centre = centre
        # asked only when the centre has send_address: the others never get the address
        self._address_of = address_of if centre.send_address else None
        self.concurrency = config.concurrency
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._clock_ms = clock_ms
        self._ssl: ssl.SSLContext | bool = True  # True: aiohttp's default, the system CAs
        if centre.ca_file is not None:
            # a private CA for this centre only; hostname checking stays on
            self._ssl = ssl.create_default_context(cafile=str(centre.ca_file))
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.concurrency, ssl=self._ssl),
            )
        return self._http

    async def send(self, delivery: Delivery, district: str) -> Outcome:
        address = None
        if self._address_of is not None:
            address = await self._address_of(delivery.device_id)
        body = delivery_body(delivery, district, address)
        timestamp = str(self._clock_ms())
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: delivery.event_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: delivery_signature(self.centre.secret, timestamp, body),
        }
        try:
            async with self._session().post(
                str(self.centre.url), data=body, headers=headers
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return DELIVERED
                retry_after = _retry_after_ms(response.headers.get("Retry-After"))
                permanent = 400 <= status < 500 and status not in TRANSIENT_4XX
                reason = await _reason(response) if permanent else ""
                return Outcome(f"HTTP {status}{reason}", permanent, retry_after)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            return Outcome(type(exc).__name__ + (f": {exc}" if str(exc) else ""))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The centre's own words for a refusal (our console answers {"error": ...}), short and
    printable, for the log and the deliveries listing."""
    try:
        text = (await response.content.read(REASON_MAX)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        return ""
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    text = "".join(c if c.isprintable() else " " for c in text).strip()[:REASON_MAX]
    return f": {text}" if text else ""


def _retry_after_ms(value: str | None) -> int:
    # only the seconds form: an HTTP date from a centre's clock is not worth trusting;
    # anything else (a date, '²', '-1') is ignored, the backoff applies
    if value is None:
        return 0
    try:
        return min(parse_whole(value.strip(), "Retry-After"), 3600) * 1000
    except Malformed:
        return 0


class Circuit(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed, open, half-open, per endpoint; the clock is an argument, so tests need no sleep.

    Closed: everything goes. After `failures` failed attempts in a row: open, nothing goes
    for `open_ms`. Then half-open: one probe goes; its success closes the circuit, its
    failure opens it again for another `open_ms`.
    """

    def __init__(self, failures: int, open_ms: int, clock_ms: Clock) -> None:
        self._threshold = failures
        self._open_ms = open_ms
        self._clock_ms = clock_ms
        self._failures = 0
        self._opened_at: int | None = None
        self._probing = False

    @property
    def state(self) -> Circuit:
        if self._opened_at is None:
            return Circuit.CLOSED
        if self._probing or self._clock_ms() >= self._opened_at + self._open_ms:
            return Circuit.HALF_OPEN
        return Circuit.OPEN

    def retry_in_ms(self) -> int:
        """How long until the circuit lets a probe through (0 if it would now)."""
        if self._opened_at is None:
            return 0
        return max(0, self._opened_at + self._open_ms - self._clock_ms())

    def allow(self) -> bool:
        """May one attempt go now? In half-open, True once: that attempt is the probe."""
        state = self.state
        if state is Circuit.CLOSED:
            return True
        if state is Circuit.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> bool:
        """Record a success; True if that closed an open circuit."""
        reopened = self._opened_at is not None
        self._failures = 0
        self._opened_at = None
        self._probing = False
        return reopened

    def failure(self) -> bool:
        """Record a failure; True if that opened the circuit (or kept it open after a probe)."""
        self._failures += 1
        if self._probing or (self._opened_at is None and self._failures >= self._threshold):
            self._opened_at = self._clock_ms()
            self._probing = False
            return True
        return False


@dataclass(frozen=True, slots=True)
class Failing:
    """A centre that has not taken a delivery since `since_ms`: its latest error."""

    since_ms: int
    error: str


@dataclass(eq=False)
class _Endpoint:
    name: str
    transport: Transport
    breaker: CircuitBreaker
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: set[str] = field(default_factory=set)
    # outcomes the store could not record: nothing is started before `store_rest_until_ms`
    store_failures: int = 0
    store_rest_until_ms: int = 0
    # since the first failed attempt after the last success (None: the last one succeeded)
    failing: Failing | None = None


class Forwarder:
    def __init__(
        self,
        store: ForwardStore,
        centres: Sequence[Centre | SiaReceiver],
        config: ForwardConfig,
        metrics: Metrics,
        *,
        district_of: Callable[[str], str],
        on_first_delivery: Callable[[Delivery], Awaitable[None] | None],
        clock_ms: Clock | None = None,
        rng: random.Random | None = None,
        transports: dict[str, Transport] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._district_of = district_of
        self._on_first_delivery = on_first_delivery
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._rng = rng or random.Random()
        self._poll_s = poll_s
        self._centres = tuple(centres)
        given = transports or {}
        self._endpoints: dict[str, _Endpoint] = {}
        for centre in centres:
            transport = given.get(centre.name) or self._transport(centre)
            breaker = CircuitBreaker(
                config.breaker_failures, int(config.breaker_open_s * 1000), self._clock_ms
            )
            self._endpoints[centre.name] = _Endpoint(centre.name, transport, breaker)
        self._tasks: set[asyncio.Task[None]] = set()
        # successes waiting to be recorded, in one transaction for as many as have come in
        # meanwhile: one fsync per delivery would cap forwarding near the disk's commit rate
        self._done: list[tuple[str, str, asyncio.Future[bool]]] = []
        self._recorder: asyncio.Task[None] | None = None
        registry = metrics.registry
        self.refused = Counter(
            "ansimi_forward_refused_total",
            "Attempts a centre refused outright (HTTP 4xx but 408/429, SIA DUH): each is"
            " parked as refused (see ansimi_forward_parked), kept, never dropped",
            ["centre"],
            registry=registry,
        )
        self.parked = Gauge(
            "ansimi_forward_parked",
            "Deliveries a centre refused, kept and waiting for a fix and a retry"
            " (GET /deliveries?state=refused, POST /admin/deliveries/retry)",
            ["centre"],
            registry=registry,
        )
        self.waiting_by_centre = Gauge(
            "ansimi_forward_waiting_by_centre",
            "Deliveries kept and not yet accepted, per centre",
            ["centre"],
            registry=registry,
        )
        self.circuit = Gauge(
            "ansimi_forward_circuit_state",
            "Per centre: 0 closed (sending), 1 half-open (probing), 2 open (resting)",
            ["centre"],
            registry=registry,
        )
        self.unrecorded = Counter(
            "ansimi_forward_unrecorded_total",
            "Delivery outcomes the store could not record (disk full?): the centre's worker"
            " rests a backoff each time instead of resending at once",
            ["centre"],
            registry=registry,
        )
        for name in self._endpoints:
            self.refused.labels(name)
            self.unrecorded.labels(name)
            self.parked.labels(name).set(0)
            self.circuit.labels(name).set(0)

    def _transport(self, centre: Centre | SiaReceiver) -> Transport:
        if isinstance(centre, SiaReceiver):
            from gateway.sia import SiaBridge  # sia builds on this module's Outcome

            return SiaBridge(centre, clock_ms=self._clock_ms)
        return HttpsCentre(centre, self._config, self._clock_ms)

    def breaker(self, centre: str) -> CircuitBreaker:
        return self._endpoints[centre].breaker

    def failing(self) -> dict[str, Failing]:
        """Centres whose latest attempt failed, and since when they have been failing."""
        return {n: e.failing for n, e in self._endpoints.items() if e.failing is not None}

    def wake(self) -> None:
        """New events were kept: look at the outbox now rather than at the next tick."""
        for endpoint in self._endpoints.values():
            endpoint.wake.set()

    def backoff_ms(self, attempts: int) -> int:
        ceiling = min(
            self._config.backoff_max_s, self._config.backoff_min_s * 2 ** min(attempts, 30)
        )
        return int(self._rng.uniform(self._config.backoff_min_s, max(ceiling, 0.001)) * 1000)

    def route(self, district: str) -> tuple[str, ...]:
        """The centres a district's events go to, by the config in force."""
        return routes_for(self._centres, district)

    async def reroute(self) -> None:
        """Route again what no centre has accepted yet, and give refused deliveries one
        more attempt: the config may have changed since (see the module docstring)."""
        now = self._clock_ms()
        added = await self._store.reroute(self.route, now)
        if added:
            log.warning("forward: %d deliveries added by the routing now in force", added)
        retried = await self._store.retry_refused(now)
        if retried:
            log.warning("forward: %d refused deliveries get another attempt at start", retried)
        gone = {
            centre: count
            for centre, count in (await self._store.waiting_by_centre()).items()
            if centre not in self._endpoints
        }
        if gone:
            # kept (and listed by GET /deliveries), but nobody will send them: say so
            log.warning(
                "forward: deliveries wait for centres no longer in the config: %s",
                ", ".join(f"{centre} ({count})" for centre, count in sorted(gone.items())),
            )

    async def run(self) -> None:
        try:
            try:
                await self.reroute()
            except Exception:
                # the store failing at start: forward what is routed; the next start retries
                log.exception("forward: cannot route again what no centre has yet")
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._gauges(), name="forward-gauges")
                for endpoint in self._endpoints.values():
                    tasks.create_task(self._serve(endpoint), name=f"forward-{endpoint.name}")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop attempts in flight (they stay in the outbox) and close connections."""
        for task in list(self._tasks):
            task.cancel()
        if self._recorder is not None:
            self._recorder.cancel()
        for endpoint in self._endpoints.values():
            with contextlib.suppress(Exception):
                await endpoint.transport.aclose()

    async def pump(self) -> int:
        """One round for every centre, awaiting the attempts it started; for tests and tools.

        Returns how many attempts it made. `run()` does the same rounds on its own.
        """
        before = set(self._tasks)
        for endpoint in self._endpoints.values():
            await self._start_due(endpoint)
        started = [task for task in self._tasks if task not in before]
        if started:
            await asyncio.gather(*started)
        return len(started)

    async def _record_delivered(self, event_id: str, centre: str) -> bool:
        """Mark a delivery done (group commit); True if it was the event's first."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._done.append((event_id, centre, done))
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.create_task(self._record(), name="forward-record")
        return await done

    async def _record(self) -> None:
        while self._done:
            batch, self._done = self._done[:1000], self._done[1000:]
            try:
                firsts = await self._store.delivered_many(
                    [(e, c) for e, c, _ in batch], self._clock_ms()
                )
            except Exception as exc:
                # not recorded: each stays due and goes again (the centre drops the repeat)
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, _, done), first in zip(batch, firsts, strict=True):
                if not done.done():
                    done.set_result(first)

    async def _gauges(self) -> None:
        while True:
            try:
                counts = await self._store.waiting_by_centre()
            except Exception:
                log.exception("forward: cannot count waiting deliveries")
            else:
                self._metrics.waiting.set(sum(counts.values()))
                for name in self._endpoints:
                    self.waiting_by_centre.labels(name).set(counts.get(name, 0))
            try:
                parked = await self._store.refused_by_centre()
            except Exception:
                log.exception("forward: cannot count refused deliveries")
            else:
                for name in self._endpoints:
                    self.parked.labels(name).set(parked.get(name, 0))
            for name, endpoint in self._endpoints.items():
                self.circuit.labels(name).set(int(endpoint.breaker.state))
            await asyncio.sleep(1.0)

    async def _serve(self, endpoint: _Endpoint) -> None:
        """One centre's worker: start due deliveries while its circuit and slots allow."""
        while True:
            endpoint.wake.clear()
            try:
                await self._start_due(endpoint)
            except Exception:
                # the store busy or failing: the next round tries again
                log.exception("forward: cannot read the outbox for %s", endpoint.name)
            wait_s = self._poll_s
            if endpoint.breaker.state is Circuit.OPEN:
                wait_s = min(wait_s, max(endpoint.breaker.retry_in_ms() / 1000, 0.01))
            resting_ms = endpoint.store_rest_until_ms - self._clock_ms()
            if resting_ms > 0:
                # a wake-up (new events) must not cut the rest short: sleep it out
                await asyncio.sleep(resting_ms / 1000)
                continue
            # asyncio.timeout, not wait_for (which can swallow a cancellation in 3.11)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await endpoint.wake.wait()

    async def _start_due(self, endpoint: _Endpoint) -> None:
        free = endpoint.transport.concurrency - len(endpoint.in_flight)
        if free <= 0 or endpoint.breaker.state is Circuit.OPEN:
            return
        if self._clock_ms() < endpoint.store_rest_until_ms:
            return  # the store could not record the last outcomes: resting
        # those in flight are still due in the store: ask for enough to see past them
        due = await self._store.due_for(
            endpoint.name, self._clock_ms(), free + len(endpoint.in_flight)
        )
        for delivery in due:
            if delivery.event_id in endpoint.in_flight:
                continue
            if free <= 0 or not endpoint.breaker.allow():
                break
            free -= 1
            endpoint.in_flight.add(delivery.event_id)
            task = asyncio.create_task(self._deliver(endpoint, delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, endpoint: _Endpoint, delivery: Delivery) -> None:
        started_ms = self._clock_ms()
        try:
            try:
                outcome = await endpoint.transport.send(
                    delivery, self._district_of(delivery.device_id)
                )
            except Exception as exc:
                # a transport bug costs this attempt, never the worker or the delivery
                log.exception("forward: %s to %s: bug", delivery.event_id, endpoint.name)
                outcome = Outcome(f"internal error: {type(exc).__name__}")
            await self._settle(endpoint, delivery, outcome, started_ms)
        except Exception:
            log.exception("forward: %s to %s: bug", delivery.event_id, endpoint.name)
        finally:
            endpoint.in_flight.discard(delivery.event_id)
            endpoint.wake.set()

    def _unrecorded(self, endpoint: _Endpoint, delivery: Delivery, exc: Exception) -> None:
        """The store refused the outcome: it stays due, so rest a backoff before the next."""
        self.unrecorded.labels(endpoint.name).inc()
        now = self._clock_ms()
        if now < endpoint.store_rest_until_ms:
            return  # one of a round that failed together: already resting, already logged
        rest_ms = self.backoff_ms(endpoint.store_failures)
        endpoint.store_failures += 1
        endpoint.store_rest_until_ms = now + rest_ms
        log.error(
            "forward: cannot record the outcome of %s to %s (%s: %s); resting %.1f s before"
            " sending to %s again (failure %d in a row)",
            delivery.event_id,
            endpoint.name,
            type(exc).__name__,
            exc,
            rest_ms / 1000,
            endpoint.name,
            endpoint.store_failures,
        )

    async def _settle(
        self, endpoint: _Endpoint, delivery: Delivery, outcome: Outcome, started_ms: int
    ) -> None:
        now = self._clock_ms()
        name = endpoint.name
        if outcome.ok:
            if endpoint.failing is not None:
                log.warning("forward: %s takes deliveries again", name)
            endpoint.failing = None
            if endpoint.breaker.success():
                log.warning("forward: %s answers again: circuit closed", name)
            try:
                first = await self._record_delivered(delivery.event_id, name)
            except Exception as exc:
                self._unrecorded(endpoint, delivery, exc)
                return
            endpoint.store_failures = 0
            self._metrics.forwarded.labels(name).inc()
            if first:
                result = self._on_first_delivery(delivery)
                if result is not None:
                    await result
            return
        attempt = delivery.attempts + 1
        assert outcome.error is not None
        # failing since the first failed attempt began, not ended: a request that timed out
        # must not push the centre's down report back by its timeout
        since = endpoint.failing.since_ms if endpoint.failing is not None else started_ms
        endpoint.failing = Failing(since, outcome.error)
        if outcome.permanent:
            # the endpoint is up (it answered): not a reason to open its circuit
            endpoint.breaker.success()
            self.refused.labels(name).inc()
            self.parked.labels(name).inc()
            log.error(
                "forward: %s refused %s of %s (attempt %d): %s; parked as refused until "
                "POST /admin/deliveries/retry or a restart",
                name,
                delivery.event_id,
                delivery.device_id,
                attempt,
                outcome.error,
            )
            await self._store.refused(delivery.event_id, name, now, str(outcome.error))
            return
        else:
            self._metrics.forward_failures.labels(name).inc()
            retry_at = now + max(self.backoff_ms(delivery.attempts), outcome.retry_after_ms)
            if endpoint.breaker.failure():
                log.warning(
                    "forward: %s failing (%s): circuit open for %.1f s",
                    name,
                    outcome.error,
                    self._config.breaker_open_s,
                )
            else:
                log.warning(
                    "forward: %s to %s failed (attempt %d): %s",
                    delivery.event_id,
                    name,
                    attempt,
                    outcome.error,
                )
        try:
            await self._store.failed(delivery.event_id, name, retry_at, outcome.error)
        except Exception as exc:
            self._unrecorded(endpoint, delivery, exc)
        else:
            endpoint.store_failures = 0
