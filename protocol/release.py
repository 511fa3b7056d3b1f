"""A release of the agent: its signed manifest, and the rules for installing it.

A release bundle (ansimi/bundle.py reads and writes the file) is a tar of wheels with a
manifest that names each wheel with its SHA-256, the release's version and the oldest
installed version it may replace. The manifest is a compact JWS (protocol/jws.py) signed
by the site's release key: a key of its own, neither the site CA's nor the gateway's, so
a stolen gateway cannot ship code to the bells. A device pins the release public key at
enrolment and trusts nothing else. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol import jws
from protocol.errors import ProtocolError, clip
from protocol.ids import VERSION_PATTERN, VERSION_RE
from protocol.jws import Signer

# a wheel's file name, safe as a tar member and a file name (no folder, no dot start)
WHEEL_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}\.whl$"
MAX_MANIFEST_BYTES: Final = 16 * 1024
MAX_FILES: Final = 64

# dotted numbers only (1.4.2): ordered without a version library, and safe as a folder name
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
WheelName = Annotated[str, StringConstraints(pattern=WHEEL_NAME_PATTERN)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class ReleaseRefused(ProtocolError, ValueError):
    """A bundle or manifest that must not be installed; ``reason`` says why, in one token.

    Reasons: ``malformed``, ``bad_signature``, ``hash_mismatch``, ``missing_file``,
    ``extra_file``, ``too_old`` (the installed version is older than the bundle's
    ``min_version``), ``not_newer`` (the bundle is not newer than what is installed).
    """

    reason = "release_refused"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Version
    # the oldest installed version this release may replace (a migration it relies on)
    min_version: Version
    # each wheel of the bundle and its SHA-256 (lowercase hex); nothing else is installed
    files: Annotated[dict[WheelName, Sha256Hex], Field(min_length=1, max_length=MAX_FILES)]
    created_ms: Annotated[int, Field(ge=0, lt=2**63)]


def version_key(version: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``: versions compare as numbers, not as text."""
    if not VERSION_RE.fullmatch(version):
        raise ReleaseRefused("malformed", f"version {clip(version)} is not dotted numbers")
    return tuple(int(part) for part in version.split("."))


def sign_manifest(manifest: Manifest, signer: Signer) -> str:
    return signer.sign(manifest.model_dump_json().encode())


def verify_manifest(token: str | bytes, release_key: Ed25519PublicKey) -> Manifest:
    """The manifest ``token`` carries, if the release key signed it; raise ReleaseRefused if not.

    The pinned key is the only one tried, whatever ``kid`` the token claims.
    """
    try:
        verified = jws.verify(token, lambda _kid: release_key, max_bytes=MAX_MANIFEST_BYTES)
    except ProtocolError as exc:
        reason = "bad_signature" if exc.reason == "bad_signature" else "malformed"
        raise ReleaseRefused(reason, f"release manifest: {exc}") from None
    try:
        return Manifest.model_validate_json(verified.payload)
    except ValidationError as exc:
        raise ReleaseRefused(
            "malformed", f"release manifest signed but not valid: {exc.errors()[0]['msg']}"
        ) from None


def check_hashes(manifest: Manifest, found: Mapping[str, str]) -> None:
    """Compare the bundle's files (name -> SHA-256 found) with the manifest's, exactly."""
    missing = sorted(set(manifest.files) - set(found))
    if missing:
        raise ReleaseRefused("missing_file", f"release {manifest.version}: {missing[0]} missing")
    extra = sorted(set(found) - set(manifest.files))
    if extra:
        raise ReleaseRefused(
            "extra_file", f"release {manifest.version}: {clip(extra[0])} is not in the manifest"
        )
    for name, digest in sorted(found.items()):
        if manifest.files[name] != digest:
            raise ReleaseRefused(
                "hash_mismatch",
                f"release {manifest.version}: {name} does not match its SHA-256 in the "
                "manifest (altered or damaged in transit: fetch it again)",
            )


def check_replaces(manifest: Manifest, installed: str) -> None:
    """Refuse a release that may not replace ``installed``: older than its minimum, or not newer."""
    if version_key(installed) < version_key(manifest.min_version):
        raise ReleaseRefused(
            "too_old",
            f"release {manifest.version} replaces {manifest.min_version} or later; "
            f"this device runs {installed}: install the releases in between first",
        )
    if version_key(manifest.version) <= version_key(installed):
        raise ReleaseRefused(
            "not_newer", f"release {manifest.version} is not newer than the installed {installed}"
        )
