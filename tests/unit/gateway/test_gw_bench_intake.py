"""bench/intake.py at toy size: it runs the intake as the service wires it, and a heartbeat
costs at least its verify (docs/performance.md quotes its figures)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[3]


async def test_intake_bench_measures_a_heartbeat_above_its_verify(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_intake", ROOT / "bench" / "intake.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    first, after = await bench.intake_us(30, tmp_path)
    verify = bench.verify_us(0.05)
    # every heartbeat is verified, so its CPU can never be less than the verify alone
    assert first > verify and after > verify
