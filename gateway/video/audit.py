"""Who exported or played back which recording, when and why: an append-only, chained log.

`<recordings_dir>/audit.jsonl`, one JSON object a line, each naming the SHA-256 of the line
before it (`prev`), so a line edited or removed afterwards breaks the chain (`verify_chain`).
It sits beside the recordings it speaks of (retention sweeps only device folders, never
this file) because the export command runs without the gateway and must audit too;
appends are serialised with an exclusive `flock` and fsynced before the recording is
handed over, so no export or playback happens unaudited.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from gateway.errors import GatewayError

AUDIT_FILE: Final = "audit.jsonl"
GENESIS: Final = "0" * 64
Action = Literal["export", "playback", "talkback", "listen"]


class AuditError(GatewayError, ValueError):
    """The audit log cannot be written, or its chain is broken (the message says where)."""


def audit_path(recordings_dir: Path) -> Path:
    return recordings_dir / AUDIT_FILE


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def append(
    recordings_dir: Path,
    action: Action,
    *,
    operator: str,
    reason: str,
    clock: Callable[[], float] = time.time,
    **facts: Any,
) -> dict[str, Any]:
    """Record one use; refuses an empty operator or reason. Returns the entry written."""
    if not operator.strip() or not reason.strip():
        raise AuditError(f"a {action} needs an operator and a reason: both are audited")
    path = audit_path(recordings_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        prev = GENESIS
        size = os.fstat(fd).st_size
        if size:
            # the last line is enough for the chain; read back only the tail
            tail = os.pread(fd, min(size, 64 * 1024), max(0, size - 64 * 1024))
            last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
            prev = _line_hash(last)
        entry = {
            **facts,
            "at": clock(),
            "action": action,
            "operator": operator,
            "reason": reason,
            "prev": prev,
        }
        line = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        os.write(fd, line)
        os.fsync(fd)
    except OSError as exc:
        raise AuditError(f"cannot write the audit log {path}: {exc}") from None
    finally:
        os.close(fd)
    return entry


def read(recordings_dir: Path) -> list[dict[str, Any]]:
    """Every entry, oldest first; raises AuditError if the chain is broken."""
    path = audit_path(recordings_dir)
    if not path.exists():
        return []
    entries = []
    prev = GENESIS
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            raise AuditError(f"{path}: line {number} is not JSON") from None
        if not isinstance(entry, dict) or entry.get("prev") != prev:
            raise AuditError(f"{path}: line {number} does not follow line {number - 1}")
        prev = _line_hash(line)
        entries.append(entry)
    return entries


verify_chain = read
