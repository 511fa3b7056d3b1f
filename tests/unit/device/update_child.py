"""Runs an update's steps in a process of its own, which SIGKILLs itself at one checkpoint.

    python update_child.py ROOT BUNDLE RELEASE_KEY_B64 KILL_AT MODE

MODE `forward`: start the update and advance it to the switch, then start the new version
once (the launcher's `boot`). MODE `back`: the same without dying, then roll it back (dying
at KILL_AT there). The parent checks what a power cut at that point leaves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from release_kit import file_fetch, unzip_install

from device.update import Updater
from protocol.keys import public_key_from_b64

CLOCK_MS = 1_000_000


def die_at(kill_at: str):  # type: ignore[no-untyped-def]
    def checkpoint(name: str) -> None:
        if name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return checkpoint


def updater(root: Path, bundle: Path, key_b64: str, checkpoint) -> Updater:  # type: ignore[no-untyped-def]
    return Updater(
        root,
        public_key_from_b64(key_b64),
        fetch=file_fetch(bundle, checkpoint),
        install=unzip_install,
        clock_ms=lambda: CLOCK_MS,
        trial_s=60.0,
        checkpoint=checkpoint,
    )


async def main(root: Path, bundle: Path, key_b64: str, kill_at: str, mode: str) -> None:
    forward = die_at(kill_at) if mode == "forward" else (lambda _name: None)
    going = updater(root, bundle, key_b64, forward)
    going.start("2.0", "https://gateway.test/bundle")
    outcome = await going.advance()
    assert outcome.ready, outcome
    going.switch()
    going.boot()
    if mode == "back":
        back = updater(root, bundle, key_b64, die_at(kill_at))
        journal = back.journal()
        assert journal is not None
        back.roll_back(journal, "health check failed")
        back.boot()


if __name__ == "__main__":
    root, bundle, key, kill_at, mode = sys.argv[1:6]
    asyncio.run(main(Path(root), Path(bundle), key, kill_at, mode))
