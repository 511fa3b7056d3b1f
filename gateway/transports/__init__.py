"""Centre transports, all behind one `Transport` interface: HTTPS (`https`) and SIA DC-09
(`sia`). The service builds one per configured centre (`build_transports`) and hands them to
the forwarder, which only schedules, retries and records; tests hand it fakes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from gateway.config import Centre, ForwardConfig, SiaReceiver
from gateway.transports.base import DELIVERED, Outcome, Transport
from gateway.transports.https import AddressOf, HttpsCentre
from gateway.transports.sia import SiaBridge

__all__ = ["DELIVERED", "HttpsCentre", "Outcome", "SiaBridge", "Transport", "build_transports"]


def build_transports(
    centres: Sequence[Centre | SiaReceiver],
    config: ForwardConfig,
    clock_ms: Callable[[], int],
    address_of: AddressOf | None = None,
) -> dict[str, Transport]:
    """One transport per centre, by name. `address_of` goes to the HTTPS centres allowed the
    address (`send_address`); the others never ask for it."""
    transports: dict[str, Transport] = {}
    for centre in centres:
        if isinstance(centre, SiaReceiver):
            transports[centre.name] = SiaBridge(centre, clock_ms=clock_ms)
        else:
            transports[centre.name] = HttpsCentre(centre, config, clock_ms, address_of)
    return transports
