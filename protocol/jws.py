"""JWS compact serialization (RFC 7515) with EdDSA over Ed25519 (RFC 8037), and nothing else.

Hand-written because a gateway runs this thousands of times a second and because a small
fixed profile is easier to make strict than a general JOSE library: one algorithm, a header
of ``alg``/``kid``/``typ`` only, canonical base64url. Tokens stay readable by any JOSE
library, so control centres can check device signatures with off-the-shelf code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from protocol._b64 import b64url_decode, b64url_encode
from protocol.errors import BadSignature, Malformed, Oversized, UnknownSigner, clip
from protocol.ids import check_id

MAX_TOKEN_BYTES: Final = 16 * 1024
ALG: Final = "EdDSA"

KeyResolver = Callable[[str], Ed25519PublicKey]
"""Maps a signer id to its public key; raises UnknownSigner (or KeyError) if there is none."""

_HEADER_PARAMS: Final = frozenset({"alg", "kid", "typ"})
# The header every Signer writes is this, the kid, and '"}'. The kid grammar needs no JSON
# escaping, so a header of exactly that form is read without the JSON parser (below).
_SIGNER_HEADER_START: Final = b'{"alg":"EdDSA","kid":"'
_SIGNATURE_BYTES: Final = 64
# Header segment -> kid for headers whose signature has verified. Each signer always sends
# the same header bytes, so a busy gateway decodes and parses each one once. Only verified
# ones are kept, so the cache holds what registered devices send, nobody else's: sized for a
# city's fleet (a cache smaller than the fleet was emptied over and over by heartbeats and
# every header parsed again: bench/gateway.py), bounded all the same (~10 MB at most).
_KID_BY_HEADER: dict[bytes, str] = {}
_KID_CACHE_MAX: Final = 50_000
_CACHED_HEADER_MAX: Final = 256  # a long "typ" must not make the cache hold megabytes


@dataclass(frozen=True, slots=True)
class Verified:
    kid: str
    payload: bytes
    token: str


class Signer:
    """Signs payloads as ``kid``. The encoded header is built once, not per message."""

    __slots__ = ("_key", "_kid", "_prefix", "_public_key")

    def __init__(self, kid: str, key: Ed25519PrivateKey) -> None:
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"Signer needs an Ed25519 private key, not {type(key).__name__}")
        self._kid = check_id(kid, "signer id")
        self._key = key
        self._public_key = key.public_key()
        # the kid grammar needs no JSON escaping, so the header can be spelled out directly
        header = _SIGNER_HEADER_START + kid.encode("ascii") + b'"}'
        self._prefix = b64url_encode(header) + b"."

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public_key

    def sign(self, payload: bytes) -> str:
        signing_input = self._prefix + b64url_encode(payload)
        signature = b64url_encode(self._key.sign(signing_input))
        return (signing_input + b"." + signature).decode("ascii")

    def __repr__(self) -> str:
        return f"Signer(kid={self._kid!r})"


def verify(
    token: str | bytes, resolve: KeyResolver, *, max_bytes: int = MAX_TOKEN_BYTES
) -> Verified:
    """Check a compact JWS and return its signer and payload; raise a ProtocolError if not.

    Cheap checks run first, so bad input is refused before the signature costs anything.
    """
    raw = _to_bytes(token, max_bytes)
    segments = raw.split(b".")
    if len(segments) != 3:
        raise Malformed(
            f"token has {len(segments)} dot-separated segments; "
            "a compact JWS has 3 (header.payload.signature)"
        )
    header_b64, payload_b64, signature_b64 = segments
    cached_kid = _KID_BY_HEADER.get(header_b64)
    header = b"" if cached_kid is not None else _decode_header(header_b64)
    payload = b64url_decode(payload_b64, "JWS payload")
    signature = b64url_decode(signature_b64, "JWS signature")
    kid = cached_kid if cached_kid is not None else _read_header(header_b64, header)
    if len(signature) != _SIGNATURE_BYTES:
        raise Malformed(
            f"JWS signature is {len(signature)} bytes; an Ed25519 signature is {_SIGNATURE_BYTES}"
        )
    try:
        key = resolve(kid)
    except KeyError:
        raise UnknownSigner(
            f"no public key for signer {kid!r}: enrol it, or check the key registry"
        ) from None
    try:
        # the signature covers the encoded text, so slice it out rather than re-encode.
        # libsodium, not OpenSSL: the same Ed25519 (RFC 8032, with libsodium's stricter
        # refusal of non-canonical and small-order values) at ~55 % of the CPU per verify
        # here (44 us against 79 us, bench/gateway.py's machine); the gateway's largest
        # single cost per message
        crypto_sign_open(
            signature + raw[: len(header_b64) + 1 + len(payload_b64)], key.public_bytes_raw()
        )
    except BadSignatureError:
        raise BadSignature(
            f"signature by {kid!r} does not verify: the token was altered in transit "
            "or signed with a key other than the registered one"
        ) from None
    if cached_kid is None and len(header_b64) <= _CACHED_HEADER_MAX:
        if len(_KID_BY_HEADER) >= _KID_CACHE_MAX:
            _KID_BY_HEADER.clear()
        _KID_BY_HEADER[header_b64] = kid
    # every byte is now known to be base64url or a dot, so this cannot fail
    text = token if isinstance(token, str) else raw.decode("ascii")
    return Verified(kid, payload, text)


def peek_kid(token: str | bytes) -> str:
    """The signer id a token claims, unverified: for routing and logs, never for trust."""
    raw = _to_bytes(token, MAX_TOKEN_BYTES)
    header_b64 = raw.partition(b".")[0]
    kid = _KID_BY_HEADER.get(header_b64)
    if kid is None:
        kid = _read_header(header_b64, _decode_header(header_b64))
    return kid


def _to_bytes(token: str | bytes, max_bytes: int) -> bytes:
    if len(token) > max_bytes:
        raise Oversized(
            f"token is {len(token)} bytes, over the {max_bytes}-byte limit; refused unread"
        )
    if isinstance(token, bytes):
        return token
    try:
        return token.encode("ascii")
    except UnicodeEncodeError:
        raise Malformed(
            "token has non-ASCII characters; a compact JWS is base64url text and dots"
        ) from None


def _decode_header(header_b64: bytes) -> bytes:
    """The header segment decoded; text that is not one (`not.a.jws`) is told so plainly,
    not with the base64 detail that happens to fail first."""
    try:
        return b64url_decode(header_b64, "JWS header")
    except Malformed as exc:
        raise Malformed(
            f"token is not a JWS: its first segment must be the base64url of a JSON header "
            f'such as {{"alg":"EdDSA","kid":...}} ({exc})'
        ) from None


def _read_header(header_b64: bytes, header: bytes) -> str:
    if header.startswith(_SIGNER_HEADER_START) and header.endswith(b'"}'):
        # A signer's own header: with no quote, backslash or non-ASCII byte in the kid, the
        # JSON parse below would give exactly this kid (a repeated name, an escape or another
        # parameter each needs one of those). Each device's first message after a gateway
        # starts, and any whose header the cache let go, skips a JSON parse.
        named = header[len(_SIGNER_HEADER_START) : -2]
        if named.isascii() and b'"' not in named and b"\\" not in named:
            return check_id(named.decode("ascii"), "JWS kid")
    try:
        # the stdlib parser, because only it reports repeated names: {"alg":"none","alg":...}
        # must not mean one thing here and another to the next JOSE library down the line
        params = json.loads(header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except Malformed:
        raise
    except (ValueError, RecursionError):
        raise Malformed(
            "token is not a JWS: its first segment decodes, but not to a UTF-8 JSON header"
        ) from None
    if not isinstance(params, dict):
        raise Malformed("JWS header must be a JSON object")
    unsupported = params.keys() - _HEADER_PARAMS
    if unsupported:
        names = ", ".join(sorted(clip(name, 30) for name in unsupported)[:5])
        raise Malformed(
            f"JWS header has unsupported parameters ({names}); only alg, kid and typ are allowed"
        )
    alg = params.get("alg")
    if not isinstance(alg, str):
        raise Malformed("JWS header has no alg; it must be 'EdDSA'")
    if alg != ALG:
        raise BadSignature(
            f"JWS alg {clip(alg, 40)} is refused; only 'EdDSA' (Ed25519) is accepted"
        )
    if not isinstance(params.get("typ", ""), str):
        raise Malformed("JWS header typ must be a string")
    kid = params.get("kid")
    if not isinstance(kid, str):
        raise Malformed("JWS header has no kid; it must name the signer")
    check_id(kid, "JWS kid")
    return kid


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, value in pairs:
        if name in params:
            raise Malformed(f"JWS header repeats {clip(name, 30)}")
        params[name] = value
    return params
