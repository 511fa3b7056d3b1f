"""`ansimi device launch`, as systemd runs it: it settles the journal, then becomes the
version `current` names (that version's code first on the path, in the same process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from release_kit import release_signer

from device.update import Journal
from protocol.keys import public_key_to_b64

REPO = Path(__file__).parents[3]


def _version(root: Path, version: str) -> None:
    """An installed version whose `ansimi_edge` only says which version it is."""
    package = root / "versions" / version / "site" / "ansimi_edge"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    main = "import os, sys\nprint(os.environ['ANSIMI_AGENT_VERSION'], *sys.argv[1:])\n"
    (package / "__main__.py").write_text(main)


def _launch(tmp_path: Path, root: Path) -> str:
    config = tmp_path / "device.toml"
    key = public_key_to_b64(release_signer().public_key)
    config.write_text(f'[update]\nroot = "{root}"\nrelease_public_key = "{key}"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "ansimi_edge", "device", "launch", "--config", str(config)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_launch_runs_the_current_version(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    _version(root, "1.0")
    (root / "current").symlink_to("versions/1.0")
    assert _launch(tmp_path, root) == f"1.0 device run --config {tmp_path / 'device.toml'}"


def test_launch_counts_a_trials_starts_and_switches_back_past_the_limit(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    for version in ("1.0", "2.0"):
        _version(root, version)
    (root / "current").symlink_to("versions/2.0")
    trial = Journal(
        step="trial", version="2.0", url="https://gw/r", previous="1.0", deadline_ms=2**62
    )  # a deadline far away: the count of starts is the point here
    (root / "update.json").write_text(trial.model_dump_json())
    starts = [_launch(tmp_path, root).split()[0] for _ in range(4)]
    # three starts of 2.0 that never passed the health check, then the previous version
    assert starts == ["2.0", "2.0", "2.0", "1.0"]
    after = Journal.model_validate_json((root / "update.json").read_text())
    assert after.step == "rolled_back" and "3 starts" in (after.reason or "")
