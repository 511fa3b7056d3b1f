"""Evidence seals: a recording's SHA-256, signed by the gateway, in a sidecar JSON file.

`<recording>.seal.json` holds the facts in the clear (so a person can read them) and a JWS
(EdDSA, `kid` = gateway id) over exactly those facts, so any JOSE library and the
gateway's public key can check it. `verify_seal` recomputes the hash from the file and
raises if anything differs: one changed byte in the recording or the sidecar fails it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

from ansimi.files import write_atomic
from gateway.errors import GatewayError
from protocol.errors import ProtocolError
from protocol.jws import KeyResolver, Signer, verify

SEAL_SUFFIX: Final = ".seal.json"
_CHUNK: Final = 1 << 20


class SealBroken(GatewayError, ValueError):
    """A recording does not match its seal (or the seal is not the gateway's)."""


def seal_path(recording: Path) -> Path:
    return recording.with_name(recording.name + SEAL_SUFFIX)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()


def seal_recording(recording: Path, signer: Signer, **facts: Any) -> Path:
    """Hash `recording`, sign the hash and `facts` (device, session, times...), write the sidecar.

    The sidecar is written atomically and flushed to disk (`ansimi.files.write_atomic`),
    so it is either whole or absent, also after a power cut.
    """
    sealed = {
        **facts,
        "file": recording.name,
        "size": recording.stat().st_size,
        "sha256": sha256_of(recording),
        "gateway": signer.kid,
    }
    document = {"facts": sealed, "jws": signer.sign(_canonical(sealed))}
    target = seal_path(recording)
    # durable: a seal that a power cut loses or truncates leaves the recording unprovable
    write_atomic(target, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return target


def verify_seal(recording: Path, resolve: KeyResolver) -> dict[str, Any]:
    """Return the sealed facts if `recording` is exactly what the gateway sealed; else raise."""
    where = seal_path(recording)
    try:
        document = json.loads(where.read_text())
        token = document["jws"]
        claimed = document["facts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SealBroken(f"{where}: unreadable seal ({exc})") from None
    try:
        signed = json.loads(verify(token, resolve).payload)
    except ProtocolError as exc:
        raise SealBroken(f"{where}: signature does not verify: {exc}") from None
    if signed != claimed:
        raise SealBroken(f"{where}: the readable facts differ from the signed ones")
    if signed.get("file") != recording.name:
        raise SealBroken(f"{where}: seals {signed.get('file')!r}, not {recording.name!r}")
    size = recording.stat().st_size
    if size != signed.get("size"):
        raise SealBroken(f"{recording}: {size} bytes, but {signed.get('size')} were sealed")
    if sha256_of(recording) != signed.get("sha256"):
        raise SealBroken(f"{recording}: SHA-256 differs from the sealed one: the file changed")
    return dict(signed)
