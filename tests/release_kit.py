"""Tiny real wheels and signed bundles for the update tests (no network, no build tool).

A wheel is a zip with the package and a `.dist-info` (METADATA, WHEEL, RECORD): enough
for `pip install --no-index --target`. Its package `ansimi_probe` says its version, so a
test can tell which version a folder holds by importing it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import zipfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ansimi.bundle import build_bundle
from protocol.jws import Signer
from protocol.keys import generate_key

PROBE = "ansimi_probe"


def release_signer(kid: str = "release-test") -> Signer:
    return Signer(kid, generate_key())


def make_wheel(folder: Path, version: str, *, extra: str = "") -> Path:
    """A pure-Python wheel of `ansimi_probe` at `version`; `extra` is more module code."""
    dist = f"{PROBE}-{version}.dist-info"
    files = {
        f"{PROBE}/__init__.py": f'VERSION = "{version}"\n{extra}',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: release_kit\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{PROBE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def make_bundle(
    folder: Path, signer: Signer, version: str, *, min_version: str = "0.1", extra: str = ""
) -> Path:
    wheels = folder / f"wheels-{version}"
    wheels.mkdir(parents=True, exist_ok=True)
    out = folder / f"ansimi-{version}.bundle"
    build_bundle(
        [make_wheel(wheels, version, extra=extra)],
        version=version,
        min_version=min_version,
        signer=signer,
        out=out,
        now_ms=1_700_000_000_000,
    )
    return out


def install_factory(root: Path, version: str) -> None:
    """What the installer leaves on a device: one version, and `current` naming it."""
    site = root / "versions" / version / "site" / PROBE
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(f'VERSION = "{version}"\n')
    (root / "current").symlink_to(f"versions/{version}")


def factory_and_bundle(tmp: Path, *, new: str = "2.0") -> tuple[Path, Path, Signer]:
    """A device at version 1.0 (its update root), a bundle of `new` and the key signing it."""
    signer = release_signer()
    bundle = make_bundle(tmp, signer, new, min_version="1.0")
    root = tmp / "opt"
    root.mkdir()
    install_factory(root, "1.0")
    return root, bundle, signer


class Clock:
    """An injected wall clock in milliseconds: tests move `ms`."""

    def __init__(self, ms: int = 1_700_000_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def running_version(root: Path) -> str:
    """The version the launcher would start: read from the folder `current` names."""
    text = (root / "current" / "site" / PROBE / "__init__.py").read_text()
    return text.split('"')[1]


def file_fetch(
    source: Path, checkpoint: Callable[[str], None]
) -> Callable[[str, Path], Awaitable[None]]:
    """Copy `source` as a download would, resuming, with a checkpoint halfway through."""

    async def fetch(url: str, part: Path) -> None:
        data = source.read_bytes()
        have = part.stat().st_size if part.exists() else 0
        with part.open("ab") as out:
            half = max(have, len(data) // 2)
            out.write(data[have:half])
            out.flush()
            os.fsync(out.fileno())
            checkpoint("fetch_half")
            out.write(data[half:])

    return fetch


async def unzip_install(wheels: Sequence[Path], target: Path) -> None:
    """What `pip install --target` does with a pure wheel, without pip's second of start-up."""
    target.mkdir()
    for wheel in wheels:
        shutil.unpack_archive(wheel, target, "zip")
