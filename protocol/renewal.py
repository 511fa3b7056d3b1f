"""Certificate self-renewal on the wire: a CSR, and the device's signature over it.

A device renews before its certificate expires by sending `POST /renew` a CSR made with its
current key and a *proof*: a JWS signed with that same key (the one the gateway holds for
it) over the device id, the CSR's SHA-256 and the time. The proof is the credential, as the
one-time token is for enrolment: only the holder of the key can make it, for that CSR, now.
Renewal keeps the key (a new key is a rotation, with a token); the gateway refuses a CSR
for another key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import Malformed, Replay
from protocol.ids import DeviceId
from protocol.jws import KeyResolver, Signer, verify

MAX_CSR_BYTES = 8 * 1024


class RenewRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: DeviceId
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CSR_BYTES)]
    proof: Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class _Proof(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: DeviceId
    csr_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    ts: Annotated[int, Field(ge=0, lt=2**63)]


def csr_digest(csr_pem: str) -> str:
    return hashlib.sha256(csr_pem.encode()).hexdigest()


def renew_request(signer: Signer, csr_pem: str, now_ms: int) -> RenewRequest:
    proof = {"device": signer.kid, "csr_sha256": csr_digest(csr_pem), "ts": now_ms}
    token = signer.sign(json.dumps(proof, separators=(",", ":")).encode())
    return RenewRequest(device_id=signer.kid, csr_pem=csr_pem, proof=token)


def check_renew_request(
    request: RenewRequest, resolve: KeyResolver, now_ms: int, window_ms: int
) -> None:
    """Raises (a ProtocolError with its reason) unless the device's own key signed this
    request's CSR within `window_ms` of `now_ms`."""
    verified = verify(request.proof, resolve)
    if verified.kid != request.device_id:
        raise Malformed(f"proof signed by {verified.kid}, not {request.device_id}")
    try:
        proof = _Proof.model_validate_json(verified.payload)
    except ValueError:
        raise Malformed("proof payload is not {device, csr_sha256, ts}") from None
    if proof.device != request.device_id or proof.csr_sha256 != csr_digest(request.csr_pem):
        raise Malformed("proof is for another device or another CSR")
    if abs(proof.ts - now_ms) > window_ms:
        raise Replay(f"proof made {(now_ms - proof.ts) / 1000:+.0f} s from now: outside the window")
