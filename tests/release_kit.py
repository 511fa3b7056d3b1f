"""Tiny real wheels and signed bundles for the update tests (no network, no build tool).

The wheels and bundles are the simulator's (simulator/updates.py): a wheel of one package,
`ansimi_probe`, that says its version, enough for `pip install --no-index --target`.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from protocol.jws import Signer
from protocol.keys import generate_key
from simulator.updates import (
    PROBE,
    install_factory,
    probe_bundle,
    running_version,
    unzip_install,
)
from simulator.updates import probe_wheel as make_wheel

__all__ = ["PROBE", "install_factory", "make_wheel", "running_version", "unzip_install"]


def release_signer(kid: str = "release-test") -> Signer:
    return Signer(kid, generate_key())


def make_bundle(
    folder: Path, signer: Signer, version: str, *, min_version: str = "0.1", extra: str = ""
) -> Path:
    return probe_bundle(folder, signer, version, min_version=min_version, extra=extra)


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
