"""The suite's one atomic write: whole or absent, its mode from the start, on disk when done."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ansimi.files import create_private, write_atomic
from ansimi.privacy import DataKey, Keyring
from console.directory import Directory
from console.operators import Operators
from console.receiver import EventLog
from device.outbox import Outbox
from gateway.video.encrypted import ChunkWriter
from gateway.video.evidence import seal_path, seal_recording
from protocol.jws import Signer
from protocol.keys import generate_key


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """What was fsynced, by path (a file or a directory): a power cut cannot be had here."""
    seen: list[Path] = []
    fsync: Callable[[int], None] = os.fsync

    def recording(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return seen


def test_the_file_is_replaced_whole_with_its_mode_despite_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        write_atomic(target, b"new", mode=0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "data.json"
    target.write_bytes(b"old")

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_the_data_and_the_rename_are_flushed(tmp_path: Path, flushed: list[Path]) -> None:
    write_atomic(tmp_path / "a", b"x")
    assert len(flushed) == 2
    assert flushed[0].parent == tmp_path and flushed[0].name.startswith(".a.")  # the data
    assert flushed[1] == tmp_path  # the directory entry of the rename


def test_not_durable_skips_the_flushes_only(tmp_path: Path, flushed: list[Path]) -> None:
    write_atomic(tmp_path / "a", b"x", durable=False)
    assert flushed == [] and (tmp_path / "a").read_bytes() == b"x"


def test_an_evidence_seal_is_on_disk_when_sealed(tmp_path: Path, flushed: list[Path]) -> None:
    # it was renamed into place without a flush: a power cut could leave it empty
    keyring = Keyring([DataKey.generate()])
    recording = tmp_path / "session.webm.enc"
    writer = ChunkWriter(recording, keyring, recording="session", codec="vp8")
    writer.write(b"frames")
    writer.close()
    sealed = seal_recording(
        recording, Signer("gw-test", generate_key()), keyring, device="bell-0001"
    )
    assert sealed == seal_path(recording) and sealed.exists()
    assert flushed[-1] == tmp_path
    assert any(p.name.startswith(f".{sealed.name}.") for p in flushed)


@pytest.mark.parametrize(
    "open_database",
    [
        lambda path: Outbox(path).close(),
        lambda path: EventLog(path),
        lambda path: Operators(path),
        lambda path: Directory(path, None),
    ],
    ids=["device outbox", "console events", "console operators", "console directory"],
)
def test_a_database_is_created_readable_by_its_owner_only(
    tmp_path: Path, open_database: Callable[[Path], object]
) -> None:
    # issue 19: databases were created 0644 under the usual umask; the gateway's store
    # is checked in tests/unit/gateway/test_gw_store.py
    old_umask = os.umask(0o022)
    try:
        open_database(tmp_path / "made.db")
    finally:
        os.umask(old_umask)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("made.db")]
    assert made and {p.name: stat.S_IMODE(p.stat().st_mode) for p in made} == {
        p.name: 0o600 for p in made
    }


def test_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    # an operator who chose 0640 for a backup group keeps it
    path = tmp_path / "console.db"
    path.write_bytes(b"")
    path.chmod(0o640)
    create_private(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
