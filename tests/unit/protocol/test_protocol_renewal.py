"""The renewal request's proof: the device's own key, over this CSR, now."""

from __future__ import annotations

import pytest

from protocol.errors import BadSignature, Malformed, Replay
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.renewal import RenewRequest, check_renew_request, renew_request

NOW = 1_800_000_000_000
WINDOW = 300_000
DEVICE = Signer("bell-0001", generate_key())


def resolve(_kid: str):  # type: ignore[no-untyped-def]
    return DEVICE.public_key


def test_a_fresh_proof_of_this_csr_by_the_device_passes() -> None:
    check_renew_request(renew_request(DEVICE, "CSR", NOW), resolve, NOW + WINDOW, WINDOW)


def test_another_csr_another_device_another_key_or_an_old_proof_is_refused() -> None:
    good = renew_request(DEVICE, "CSR", NOW)
    with pytest.raises(Malformed, match="another CSR"):
        swapped = good.model_copy(update={"csr_pem": "ANOTHER CSR"})
        check_renew_request(swapped, resolve, NOW, WINDOW)
    with pytest.raises(Malformed, match="not bell-0002"):
        check_renew_request(
            good.model_copy(update={"device_id": "bell-0002"}), resolve, NOW, WINDOW
        )
    stranger = renew_request(Signer("bell-0001", generate_key()), "CSR", NOW)
    with pytest.raises(BadSignature):
        check_renew_request(stranger, resolve, NOW, WINDOW)
    with pytest.raises(Replay):
        check_renew_request(good, resolve, NOW + WINDOW + 1, WINDOW)
    assert isinstance(good, RenewRequest)
