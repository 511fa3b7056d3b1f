"""`ansimi gateway run` sets the garbage collector for a long run once the gateway is ready."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any, cast

import pytest

from gateway.cli import _serve
from gateway.service import FULL_COLLECTION_EVERY


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # Python's defaults, whatever ran before
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Started:
    """What `_serve` uses of a `Gateway`: `run()` and `ready`, noting the collector's
    settings before and after it says it is ready."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.seen: list[tuple[int, int]] = []

    async def run(self) -> None:
        self.seen.append((gc.get_threshold()[2], gc.get_freeze_count()))
        self.ready.set()
        for _ in range(3):  # the ready waiter's wake-up and its done callback
            await asyncio.sleep(0)
        self.seen.append((gc.get_threshold()[2], gc.get_freeze_count()))


async def test_full_collections_rarer_and_the_start_frozen_once_ready(gc_restored: None) -> None:
    assert gc.get_threshold()[2] != FULL_COLLECTION_EVERY
    service = _Started()
    await _serve(cast(Any, service))
    (before_threshold, before_frozen), (after_threshold, after_frozen) = service.seen
    assert before_threshold != FULL_COLLECTION_EVERY
    assert after_threshold == FULL_COLLECTION_EVERY
    assert after_frozen > before_frozen
