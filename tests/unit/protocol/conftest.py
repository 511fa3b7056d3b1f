from __future__ import annotations

from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from protocol_testkit import DEVICE, DEVICE_KEY, GATEWAY, GATEWAY_KEY

from protocol import Signer


@pytest.fixture
def device_signer() -> Signer:
    return Signer(DEVICE, DEVICE_KEY)


@pytest.fixture
def gateway_signer() -> Signer:
    return Signer(GATEWAY, GATEWAY_KEY)


@pytest.fixture
def resolve() -> Callable[[str], Ed25519PublicKey]:
    """A registry that knows the device and the gateway, as a plain dict lookup."""
    return {
        DEVICE: DEVICE_KEY.public_key(),
        GATEWAY: GATEWAY_KEY.public_key(),
    }.__getitem__
