"""Fixtures for the hardware-layer tests: gpiozero mock pin factories, fresh per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin


@pytest.fixture
def mock_factory() -> Iterator[MockFactory]:
    """Plain mock pins (inputs, on/off outputs)."""
    factory = MockFactory()
    yield factory
    # Pins and reservations would otherwise leak into the next test.
    factory.close()
    factory.reset()


@pytest.fixture
def pwm_factory() -> Iterator[MockFactory]:
    """Mock pins that also do PWM, which the discreet LED (PWMLED) needs."""
    factory = MockFactory(pin_class=MockPWMPin)
    yield factory
    factory.close()
    factory.reset()
