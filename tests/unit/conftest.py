"""The fast tier (`make test-fast`): unit tests start no broker and no browser."""

from __future__ import annotations

from typing import NoReturn

import pytest


@pytest.fixture
def mosquitto() -> NoReturn:
    pytest.fail("a unit test starts no broker (`make test-fast`): move it to tests/integration")
