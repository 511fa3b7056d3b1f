"""Evidence seals: an encrypted recording's digests, signed by the gateway, in a sidecar.

`<recording>.seal.json` holds the facts in the clear (so a person can read them) and a JWS
(EdDSA, `kid` = gateway id) over exactly those facts, so any JOSE library and the
gateway's public key can check it. The facts name both digests of the encrypted
recording (encrypted.py): the ciphertext of its chunks, and the plaintext they decrypt to,
which is the byte-exact file an evidence export hands to the police. `verify_seal`
decrypts and authenticates every chunk, recomputes both digests and raises if anything
differs: one changed byte in the recording or the sidecar fails it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

from ansimi.files import write_atomic
from ansimi.privacy import Keyring
from gateway.errors import GatewayError
from gateway.video.encrypted import RecordingBroken, check
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


def seal_recording(recording: Path, signer: Signer, keyring: Keyring, **facts: Any) -> Path:
    """Check `recording`, sign its digests and `facts` (device, session, times...) in a sidecar.

    An incomplete recording (the gateway died while writing it) is sealed as far as it
    reads, with `complete` false. The sidecar is written atomically and flushed to disk
    (`ansimi.files.write_atomic`), so it is either whole or absent, also after a power cut.
    Raises RecordingBroken if a chunk does not open.
    """
    opened = check(recording, keyring)
    sealed = {
        **facts,
        "file": recording.name,
        "recording": opened.recording,
        "codec": opened.codec,
        "chunks": opened.chunks,
        "complete": opened.complete,
        "ciphertext_sha256": opened.ciphertext_sha256,
        "plaintext_sha256": opened.plaintext_sha256,
        "plaintext_size": opened.plaintext_size,
        "gateway": signer.kid,
    }
    document = {"facts": sealed, "jws": signer.sign(_canonical(sealed))}
    target = seal_path(recording)
    # durable: a seal that a power cut loses or truncates leaves the recording unprovable
    write_atomic(target, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    return target


def verify_seal(recording: Path, resolve: KeyResolver, keyring: Keyring) -> dict[str, Any]:
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
    try:
        opened = check(recording, keyring)
    except (RecordingBroken, OSError) as exc:
        raise SealBroken(str(exc)) from None
    if opened.chunks != signed.get("chunks"):
        raise SealBroken(
            f"{recording}: {opened.chunks} chunks, but {signed.get('chunks')} were sealed"
        )
    if opened.ciphertext_sha256 != signed.get("ciphertext_sha256"):
        raise SealBroken(f"{recording}: ciphertext SHA-256 differs from the sealed one")
    if opened.plaintext_sha256 != signed.get("plaintext_sha256"):
        raise SealBroken(f"{recording}: plaintext SHA-256 differs from the sealed one")
    return dict(signed)
