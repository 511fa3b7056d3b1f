"""Forwarding: every kept event goes to its control centres, until each has said yes.

The outbox lives in the store, so a restart resumes where it stopped. A delivery is an
HTTPS POST of JSON carrying the device's original JWS, an `Idempotency-Key` (the event
id, so a centre can drop our retries) and an HMAC-SHA256 of the body with the centre's
secret. Failures back off exponentially with full jitter; nothing is ever dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import aiohttp

from gateway.config import Centre, ForwardConfig
from gateway.metrics import Metrics
from gateway.store import Delivery, Store
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_signature,
)

log = logging.getLogger(__name__)


def delivery_body(delivery: Delivery, district: str) -> bytes:
    return json.dumps(
        {
            "event_id": delivery.event_id,
            "device_id": delivery.device_id,
            "district": district,
            "type": delivery.type,
            "ts_ms": delivery.ts_ms,
            "body": json.loads(delivery.body_json),
            "jws": delivery.jws,
        },
        separators=(",", ":"),
    ).encode()


class Forwarder:
    def __init__(
        self,
        store: Store,
        centres: list[Centre],
        config: ForwardConfig,
        metrics: Metrics,
        *,
        district_of: Callable[[str], str],
        on_first_delivery: Callable[[Delivery], Awaitable[None] | None],
        executor: Executor | None = None,
        clock_ms: Callable[[], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._centres = {c.name: c for c in centres}
        self._config = config
        self._metrics = metrics
        self._district_of = district_of
        self._on_first_delivery = on_first_delivery
        self._executor = executor
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._in_flight: set[tuple[str, str]] = set()
        self._slots = {name: asyncio.Semaphore(config.concurrency) for name in self._centres}
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """New events were kept: look at the outbox now rather than at the next tick."""
        self._wake.set()

    def backoff_ms(self, attempts: int) -> int:
        ceiling = min(
            self._config.backoff_max_s, self._config.backoff_min_s * 2 ** min(attempts, 30)
        )
        return int(self._rng.uniform(self._config.backoff_min_s, max(ceiling, 0.001)) * 1000)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                now = self._clock_ms()
                due = await loop.run_in_executor(self._executor, self._store.due, now, 1000)
                self._metrics.waiting.set(
                    await loop.run_in_executor(self._executor, self._store.waiting_count)
                )
                for delivery in due:
                    key = (delivery.event_id, delivery.centre)
                    if key in self._in_flight:
                        continue
                    self._in_flight.add(key)
                    task = asyncio.create_task(self._deliver(http, delivery))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                self._wake.clear()

    async def _deliver(self, http: aiohttp.ClientSession, delivery: Delivery) -> None:
        loop = asyncio.get_running_loop()
        key = (delivery.event_id, delivery.centre)
        try:
            centre = self._centres.get(delivery.centre)
            error: str | None
            if centre is None:
                error = f"centre {delivery.centre!r} is no longer configured"
            else:
                async with self._slots[centre.name]:
                    error = await self._post(http, centre, delivery)
            now = self._clock_ms()
            if error is None:
                first = await loop.run_in_executor(
                    self._executor, self._store.delivered, delivery.event_id, delivery.centre, now
                )
                self._metrics.forwarded.labels(delivery.centre).inc()
                if first:
                    result = self._on_first_delivery(delivery)
                    if result is not None:
                        await result
            else:
                self._metrics.forward_failures.labels(delivery.centre).inc()
                log.warning(
                    "forward: %s to %s failed (attempt %d): %s",
                    delivery.event_id,
                    delivery.centre,
                    delivery.attempts + 1,
                    error,
                )
                retry_at = now + self.backoff_ms(delivery.attempts)
                await loop.run_in_executor(
                    self._executor,
                    self._store.failed,
                    delivery.event_id,
                    delivery.centre,
                    retry_at,
                    error,
                )
        finally:
            self._in_flight.discard(key)

    async def _post(
        self, http: aiohttp.ClientSession, centre: Centre, delivery: Delivery
    ) -> str | None:
        """One attempt; None on success, else what went wrong."""
        body = delivery_body(delivery, self._district_of(delivery.device_id))
        timestamp = str(self._clock_ms())
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: delivery.event_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: delivery_signature(centre.secret, timestamp, body),
        }
        try:
            async with http.post(str(centre.url), data=body, headers=headers) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__ + (f": {exc}" if str(exc) else "")
