"""Recordings' retention and legal hold.

A recording (and its seal) is deleted once older than `[video] retention_days`, unless it
is on legal hold: a `<recording>.hold.json` beside it, saying who put it there, when and
why. A held recording is kept, with its seal, until the hold is released; hold files are
never swept. The hub sweeps periodically; `ansimi gateway purge` sweeps on demand (with
`--dry-run`), and `ansimi gateway hold` / `release` manage holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Final

from gateway.errors import GatewayError
from gateway.video.evidence import SEAL_SUFFIX

log = logging.getLogger(__name__)

HOLD_SUFFIX: Final = ".hold.json"


class HoldError(GatewayError, ValueError):
    """A hold cannot be placed or released as asked."""


def hold_path(recording: Path) -> Path:
    return recording.with_name(recording.name + HOLD_SUFFIX)


def recording_of(path: Path) -> Path:
    """The recording a file belongs to: itself, or the one its seal or hold describes."""
    for suffix in (SEAL_SUFFIX, HOLD_SUFFIX):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def is_held(recording: Path) -> bool:
    return hold_path(recording).is_file()


def place_hold(recording: Path, *, by: str, reason: str, now: float | None = None) -> Path:
    """Put a recording on legal hold; refuses a file that is not a sealed recording."""
    if not recording.is_file() or recording.name.endswith((SEAL_SUFFIX, HOLD_SUFFIX)):
        raise HoldError(f"{recording} is not a recording: name the .mp4 or .webm file")
    if not recording.with_name(recording.name + SEAL_SUFFIX).is_file():
        raise HoldError(
            f"{recording} has no seal yet (still recording, or its seal was lost): a hold "
            "is for sealed evidence; wait until the stream ends"
        )
    hold = hold_path(recording)
    facts = {"by": by, "reason": reason, "at": now if now is not None else time.time()}
    hold.write_text(json.dumps(facts, ensure_ascii=False, indent=2) + "\n")
    return hold


def release_hold(recording: Path) -> None:
    try:
        hold_path(recording).unlink()
    except FileNotFoundError:
        raise HoldError(f"{recording} is not on hold") from None


def sweep(
    root: Path,
    retention_days: float,
    now: float,
    *,
    active: Collection[Path | None] = (),
    dry_run: bool = False,
) -> list[Path]:
    """Delete (or, dry run, list) recordings and seals older than the retention period.

    Skipped: recordings still being written (`active`), anything on legal hold, and hold
    files themselves. A retention of 0 keeps everything.
    """
    days = retention_days
    if days <= 0 or not root.is_dir():
        return []
    cutoff = now - days * 86_400
    due: list[Path] = []
    for path in sorted(root.glob("*/*")):
        if not path.is_file() or path.name.endswith(HOLD_SUFFIX):
            continue
        recording = recording_of(path)
        if recording in active or is_held(recording):
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                due.append(path)
    if not dry_run:
        for path in due:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if due:
            log.info("video: retention removed %d files older than %g days", len(due), days)
    return due
