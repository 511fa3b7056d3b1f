"""Centre transports are built in one place and handed to the forwarder, which builds none."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Centre, ForwardConfig, SiaReceiver
from gateway.forward import Forwarder
from gateway.metrics import Metrics
from gateway.store import SqliteStore
from gateway.transports import HttpsCentre, SiaBridge, build_transports

HTTPS = Centre(name="central", url="https://127.0.0.1/events", secret="s" * 16)
SIA = SiaReceiver(name="monitoring", port=12128, account="1234")


def test_one_transport_per_centre_of_its_kind() -> None:
    transports = build_transports([HTTPS, SIA], ForwardConfig(), lambda: 0)

    assert set(transports) == {"central", "monitoring"}
    assert isinstance(transports["central"], HttpsCentre)
    assert isinstance(transports["monitoring"], SiaBridge)


async def test_the_forwarder_is_handed_a_transport_for_every_centre(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gateway.db")
    try:
        with pytest.raises(ValueError, match="monitoring"):
            Forwarder(
                store,
                [HTTPS, SIA],
                ForwardConfig(),
                Metrics(),
                district_of=lambda _device: "mapo",
                on_first_delivery=lambda _delivery: None,
                transports=build_transports([HTTPS], ForwardConfig(), lambda: 0),
            )
    finally:
        await store.close()
