"""When a due certificate renewal may connect the bell again: not while that would cut an
incident's messages (an open incident, an alert the gateway has not received), unless the
running certificate expires within a day. Injected clock; no gateway answers here (the
renewal that goes ahead fails to connect, which is what tells it was tried); the renewal
that succeeds and connects again is in tests/integration/provisioning/test_prov_enrolment.py."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from release_kit import Clock

from ansimi.broker import free_port
from device.agent import Agent
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.hal.ports import InputEvent
from device.renew import DAY_MS, RENEW_ANYWAY_MS
from protocol.jws import Signer
from protocol.keys import generate_key, save_private_key
from siteca import pki

GATEWAY = Signer("gw-test", generate_key())
LIFETIME_MS = 40 * DAY_MS


def certificate(key: Ed25519PrivateKey, not_after_ms: int) -> bytes:
    """A site CA's certificate for the device's key, valid until `not_after_ms`."""
    until = dt.datetime.fromtimestamp(not_after_ms / 1000, dt.UTC)
    ca = pki.create_ca("test", now=until - dt.timedelta(days=365))
    issued = pki.issue_client_cert(
        ca, "bell-0001", key.public_key(), now=until, lifetime=dt.timedelta(0)
    )
    return pki.cert_to_pem(issued)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def agent(tmp_path: Path, clock: Clock) -> Iterator[Agent]:
    key = generate_key()
    signer = Signer("bell-0001", key)
    save_private_key(tmp_path / "device.key", key)
    cert_file = tmp_path / "device.crt"
    cert_file.write_bytes(certificate(key, clock.ms + LIFETIME_MS))
    config = DeviceConfig.model_validate(
        {
            "device": {
                "id": "bell-0001",
                "state_dir": tmp_path,
                "key_file": tmp_path / "device.key",
            },
            "mqtt": {"cert_file": cert_file},
            # nothing listens there: a renewal tried fails, and says so
            "renew": {"gateway_url": f"https://127.0.0.1:{free_port()}"},
        }
    )
    hardware = Hardware(FakeInputs(on_mains=True), FakeIndicator(), None, None)
    made = Agent(
        config, signer=signer, gateway_key=GATEWAY.public_key, hardware=hardware, clock_ms=clock
    )
    yield made
    made.outbox.close()


def due(clock: Clock) -> None:
    clock.ms += 11 * DAY_MS  # 29 days left: within the 30 days before expiry


async def test_a_quiet_bell_renews_when_due(
    agent: Agent, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    assert await agent.renew_certificate() is None and agent.renewal_held_by is None
    due(clock)
    assert agent.renewal.due()
    with caplog.at_level(logging.WARNING, "device.agent"):
        assert await agent.renew_certificate() is None
    assert "cannot reach" in caplog.text  # tried: nobody answered
    assert agent.renewal_held_by is None


async def test_a_due_renewal_waits_while_the_bells_incident_is_open(
    agent: Agent, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    agent.on_input(InputEvent("emergency", "pressed"))
    agent.on_input(InputEvent("emergency", "released"))
    assert agent.behaviour.incident is not None
    due(clock)
    with caplog.at_level(logging.WARNING, "device.agent"):
        assert await agent.renew_certificate() is None
    assert agent.renewal_held_by == "an incident is open"
    assert "cannot reach" not in caplog.text  # not even asked: nothing to connect with


async def test_a_due_renewal_waits_for_an_alert_the_gateway_has_not_received(
    agent: Agent, clock: Clock
) -> None:
    # a test press is no incident, but its alert is on its way through the link
    assert agent.test_presses.press("command") is not None
    assert agent.behaviour.incident is None
    due(clock)
    assert await agent.renew_certificate() is None
    assert agent.renewal_held_by == "1 alerts wait for the gateway's receipt"


async def test_a_renewal_goes_ahead_during_an_incident_when_the_certificate_would_expire(
    agent: Agent, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    agent.on_input(InputEvent("emergency", "pressed"))
    due(clock)
    assert await agent.renew_certificate() is None
    assert agent.renewal_held_by is not None
    not_after = agent.renewal.not_after_ms()
    assert not_after is not None
    clock.ms = not_after - RENEW_ANYWAY_MS  # a day left: an expired one cuts it for good
    with caplog.at_level(logging.WARNING, "device.agent"):
        assert await agent.renew_certificate() is None
    assert "cannot reach" in caplog.text  # tried: nobody answered
    assert agent.renewal_held_by is None
