"""bench/fleet.py at toy size: it runs, holds everyone, loses nothing, ends in one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[3]


@pytest.mark.slow
def test_fleet_bench_prints_figures_baseline_and_ratio() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "fleet.py"),
            "--agents",
            "40",
            "--hold",
            "2",
            "--heartbeat",
            "1",
            "--rate",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["bench"] == "fleet"
    for phase in (last["figures"], last["baseline"]):
        assert phase["held"] == 40
        assert phase["heartbeats_sent"] >= 40
        assert phase["heartbeats_lost"] == 0
        assert phase["rss_kb_per_device"] > 0
    assert last["ratio"] is None or last["ratio"] > 0
