"""Gateway to control centre: the HTTPS delivery's headers and their HMAC.

Part of the wire contract, so the gateway that signs and the centre that checks share
one definition. The body's own integrity rests on the device's JWS inside it; the HMAC
proves the request came from our gateway, and the timestamp bounds its replay.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

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
