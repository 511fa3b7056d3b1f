"""Fixtures shared by every test folder: a real mosquitto, a real PostgreSQL, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_testkit import PgServer, postgres_bin

from ansimi.broker import Mosquitto, MosquittoConfig, mosquitto_path


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh broker for one test: MQTT v5 and 3.1.1, loopback only, anonymous."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto` (.ci/run does)")
    broker = Mosquitto(MosquittoConfig(state_dir=tmp_path / "broker"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def new_postgres() -> PgServer:
    """A new, started PostgreSQL; skips only when the server is not installed."""
    bin = postgres_bin()
    if bin is None:
        pytest.skip(
            "PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin/postgres): "
            "`apt-get install -y postgresql` (scripts/system-deps.sh does)"
        )
    server = PgServer.create(bin)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One PostgreSQL for the session; a test takes its own database (`new_database`)."""
    server = new_postgres()
    try:
        yield server
    finally:
        server.remove()
