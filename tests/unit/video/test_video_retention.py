"""Recordings' retention and legal hold: held evidence is kept, the rest goes on time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ansimi_testkit import CENTRAL_TOML
from click.testing import CliRunner

from ansimi_edge.cli import cli
from gateway.video.retention import HoldError, place_hold, release_hold, sweep

NOW = 1_000_000_000.0
DAY = 86_400


def recording(root: Path, name: str, age_days: float, *, sealed: bool = True) -> Path:
    path = root / "bell-0001" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [path, path.with_name(path.name + ".seal.json")] if sealed else [path]
    for f in files:
        f.write_bytes(b"x")
        os.utime(f, (NOW - age_days * DAY, NOW - age_days * DAY))
    return path


def test_a_held_recording_and_its_seal_outlive_retention(tmp_path: Path) -> None:
    held = recording(tmp_path, "held.mp4", 40)
    old = recording(tmp_path, "old.mp4", 40)
    fresh = recording(tmp_path, "fresh.mp4", 1)
    place_hold(held, by="case 2026-1188", reason="stalking case evidence", now=NOW)

    removed = sweep(tmp_path, 30, NOW)

    assert sorted(removed) == sorted([old, old.with_name("old.mp4.seal.json")])
    assert held.exists() and held.with_name("held.mp4.seal.json").exists()
    assert fresh.exists()
    # once released, retention applies again
    release_hold(held)
    assert held in sweep(tmp_path, 30, NOW)
    assert not held.exists()


def test_dry_run_lists_and_deletes_nothing(tmp_path: Path) -> None:
    old = recording(tmp_path, "old.mp4", 40)
    assert sweep(tmp_path, 30, NOW, dry_run=True) == sorted(
        [old, old.with_name("old.mp4.seal.json")]
    )
    assert old.exists()


def test_a_recording_still_being_written_is_not_swept(tmp_path: Path) -> None:
    live = recording(tmp_path, "live.mp4", 40, sealed=False)
    assert sweep(tmp_path, 30, NOW, active={live}) == []
    assert live.exists()


def test_only_sealed_recordings_can_be_held(tmp_path: Path) -> None:
    unsealed = recording(tmp_path, "unsealed.mp4", 1, sealed=False)
    with pytest.raises(HoldError, match="no seal yet"):
        place_hold(unsealed, by="x", reason="y")
    with pytest.raises(HoldError, match="not a recording"):
        place_hold(tmp_path / "bell-0001" / "absent.mp4", by="x", reason="y")
    with pytest.raises(HoldError, match="not on hold"):
        release_hold(unsealed)


def test_cli_hold_then_purge_keeps_it(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    held = recording(rec_dir, "held.mp4", 400)
    recording(rec_dir, "old.mp4", 400)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'database = "{tmp_path / "gateway.db"}"\n'
        f'[video]\nrecordings_dir = "{rec_dir}"\nretention_days = 30\n' + CENTRAL_TOML
    )
    runner = CliRunner()
    result = runner.invoke(
        cli, ["gateway", "hold", str(held), "--by", "case 7", "--reason", "court"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["gateway", "purge", "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would delete 2 recording file(s)" in result.output
    assert (rec_dir / "bell-0001" / "old.mp4").exists()
    result = runner.invoke(cli, ["gateway", "purge", "--config", str(config)])
    assert "deleted 2 recording file(s)" in result.output
    assert held.exists() and not (rec_dir / "bell-0001" / "old.mp4").exists()
