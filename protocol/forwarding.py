"""Gateway to control centre: the HTTPS delivery's headers, their HMAC, and its body.

Part of the wire contract, so the gateway that signs and the centre that checks share
one definition. The body's own integrity rests on the device's JWS inside it; the HMAC
proves the request came from our gateway, and the timestamp bounds its replay.

A delivery's `body` is the body exactly as its signer wrote it (`signed_body`), never our
own model re-serialised: a device built on another JOSE library may leave out fields that
have defaults, and a centre compares the delivery with the signed payload.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Final

from protocol._b64 import b64url_decode
from protocol.errors import Malformed

SIGNATURE_HEADER: Final = "X-Ansimi-Signature"
TIMESTAMP_HEADER: Final = "X-Ansimi-Timestamp"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


def delivery_signature(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, timestamp + "." + body)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signature_matches(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    # compare_digest raises on a str outside ASCII: a stray header byte is just a wrong one
    expected = delivery_signature(secret, timestamp, body)
    return signature.isascii() and hmac.compare_digest(signature, expected)


def signed_body(jws: str) -> Any:
    """The `body` of a compact JWS's payload, as signed; not verified here.

    For the gateway, which verified the token when it kept it: it forwards what the signer
    wrote, and the centre verifies the signature itself.
    """
    segments = jws.split(".")
    if len(segments) != 3:
        raise Malformed(f"token has {len(segments)} dot-separated segments, not 3")
    raw = b64url_decode(segments[1].encode("ascii", "replace"), "JWS payload")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise Malformed(f"JWS payload is not JSON: {exc}") from None
    if not isinstance(payload, dict) or "body" not in payload:
        raise Malformed("JWS payload is not a message: it has no body")
    return payload["body"]
