"""Fixtures shared by every test folder: a real mosquitto, a real PostgreSQL, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from pg_testkit import PgServer, new_postgres

from ansimi.broker import Mosquitto, MosquittoConfig, mosquitto_path

# Property tests check what comes out, not how fast: hypothesis's 200 ms deadline per example
# failed a round-trip test on a loaded CI machine. Speed lives in bench/.
settings.register_profile("ansimi", deadline=None)
settings.load_profile("ansimi")


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """One PostgreSQL for the session; a test takes its own database (`new_database`)."""
    server = new_postgres()
    try:
        yield server
    finally:
        server.remove()
