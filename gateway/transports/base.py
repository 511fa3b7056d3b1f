"""What every centre transport is: one delivery in, one `Outcome` out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gateway.store import Delivery


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
