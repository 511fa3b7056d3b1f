"""Ed25519 keys: creation, PEM files for private keys, and the registry's text form.

The only I/O in ``protocol`` is here, for the device's own private key file: it is written
atomically so a power cut during enrolment never leaves a half-written key behind.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol._b64 import b64url_decode, b64url_encode
from protocol.errors import KeyFileMissing, Malformed, clip

DEFAULT_HINT = "run `ansimi device enrol`"


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_to_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Malformed(
            "not an unencrypted PEM private key; expected PKCS#8 '-----BEGIN PRIVATE KEY-----'"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise Malformed(f"PEM holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def public_key_to_b64(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64url_encode(raw).decode("ascii")


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    """Read the registry form: the raw 32 key bytes, base64url without padding (43 chars)."""
    if not isinstance(text, str) or len(text) != 43 or not text.isascii():
        raise Malformed(
            f"public key {clip(text)} is not 43 characters of base64url (raw Ed25519, no padding)"
        )
    raw = b64url_decode(text.encode("ascii"), "public key")
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise Malformed(f"public key {clip(text)} is not a valid Ed25519 key") from None


def save_private_key(path: str | os.PathLike[str], key: Ed25519PrivateKey) -> None:
    """Write ``key`` as PEM readable by its owner only, replacing ``path`` atomically."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    # created 0600 from the start: no window in which another user could open it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_key_to_pem(key))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # the rename is only durable once the directory entry is on disk too
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_private_key(
    path: str | os.PathLike[str], *, hint: str = DEFAULT_HINT
) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileMissing(f"no key at {os.fspath(path)}: {hint}") from None
    try:
        return private_key_from_pem(data)
    except Malformed as exc:
        raise Malformed(f"key file {os.fspath(path)}: {exc}") from None
