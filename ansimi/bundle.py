"""The release bundle file: a tar of the agent's wheels and their signed manifest.

Layout (an uncompressed POSIX tar: the wheels are zip files already):

    manifest.jws            the manifest (protocol/release.py), signed by the release key
    <name>.whl ...          each wheel the manifest names, and nothing else

Reading checks everything before anything is used: the signature with the pinned release
key, that each member is a plain file at the top level, and each file's SHA-256 against
the manifest. The gateway checks a bundle when it is added; the device checks it again
after downloading and once more while extracting it (it trusts no one in between).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.files import fsync_dir, write_atomic
from protocol.jws import Signer
from protocol.release import (
    MAX_MANIFEST_BYTES,
    Manifest,
    ReleaseRefused,
    check_hashes,
    sign_manifest,
    verify_manifest,
)

MANIFEST_NAME: Final = "manifest.jws"
# a bundle larger than this is refused unread: the agent's wheels are a few megabytes
MAX_BUNDLE_BYTES: Final = 512 * 1024 * 1024
_CHUNK: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    manifest_token: str


def build_bundle(
    wheels: Sequence[Path],
    *,
    version: str,
    min_version: str,
    signer: Signer,
    out: Path,
    now_ms: int,
) -> Manifest:
    """Write a signed bundle of ``wheels`` to ``out`` (atomically) and return its manifest."""
    names = [w.name for w in wheels]
    if len(set(names)) != len(names):
        raise ReleaseRefused("malformed", "two wheels with the same file name")
    try:
        manifest = Manifest(
            version=version,
            min_version=min_version,
            files={w.name: sha256_file(w) for w in wheels},
            created_ms=now_ms,
        )
    except ValueError as exc:
        raise ReleaseRefused("malformed", f"release manifest: {exc}") from None
    token = sign_manifest(manifest, signer).encode("ascii")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, MANIFEST_NAME, io.BytesIO(token), len(token))
        for wheel in wheels:
            with wheel.open("rb") as handle:
                _add(tar, wheel.name, handle, wheel.stat().st_size)
    write_atomic(out, buffer.getvalue())
    return manifest


def read_bundle(path: Path, release_key: Ed25519PublicKey) -> VerifiedBundle:
    """Check the bundle at ``path`` end to end; raise ReleaseRefused naming what is wrong."""
    if path.stat().st_size > MAX_BUNDLE_BYTES:
        raise ReleaseRefused("malformed", f"{path} is larger than {MAX_BUNDLE_BYTES} bytes")
    token = b""
    found: dict[str, str] = {}
    for member, handle in _members(path):
        if member.name == MANIFEST_NAME:
            if token or member.size > MAX_MANIFEST_BYTES:
                raise ReleaseRefused("malformed", f"{path}: two manifests, or one too large")
            token = handle.read()
        elif member.name in found:
            raise ReleaseRefused("malformed", f"{path}: {member.name} appears twice")
        else:
            found[member.name] = _sha256_stream(handle)
    if not token:
        raise ReleaseRefused("malformed", f"{path} has no {MANIFEST_NAME}: not a release bundle")
    manifest = verify_manifest(token, release_key)
    check_hashes(manifest, found)
    return VerifiedBundle(path, manifest, token.decode("ascii"))


def extract_wheels(bundle: VerifiedBundle, dest: Path) -> list[Path]:
    """Write the bundle's wheels into ``dest`` (which must exist), checking each hash again.

    The file may have changed since it was read: each wheel is hashed as it is written and
    refused (and removed) if it differs from the manifest.
    """
    written: list[Path] = []
    for member, handle in _members(bundle.path):
        if member.name == MANIFEST_NAME:
            continue
        expected = bundle.manifest.files.get(member.name)
        target = dest / member.name
        digest = hashlib.sha256()
        with target.open("wb") as out:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if expected != digest.hexdigest():
            target.unlink()
            raise ReleaseRefused(
                "hash_mismatch", f"{bundle.path}: {member.name} changed since it was checked"
            )
        written.append(target)
    check_hashes(bundle.manifest, {w.name: bundle.manifest.files[w.name] for w in written})
    fsync_dir(dest)
    return written


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """Each member of the tar at ``path`` with its content; only plain top-level files."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or "/" in member.name or member.name.startswith("."):
                    raise ReleaseRefused(
                        "malformed",
                        f"{path}: member {member.name[:80]!r} is not a plain top-level file",
                    )
                handle = tar.extractfile(member)
                if handle is None:  # pragma: no cover - isreg() members always have content
                    raise ReleaseRefused("malformed", f"{path}: {member.name} has no content")
                yield member, handle
    except tarfile.TarError as exc:
        raise ReleaseRefused("malformed", f"{path} is not a readable tar: {exc}") from None


def _add(tar: tarfile.TarFile, name: str, content: IO[bytes], size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    tar.addfile(info, content)


def _sha256_stream(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a whole file, in lowercase hex."""
    with path.open("rb") as handle:
        return _sha256_stream(handle)
