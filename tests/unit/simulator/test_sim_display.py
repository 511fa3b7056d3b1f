"""The progress display: a table on a terminal, a line every few seconds in CI logs."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from simulator.cli import Display
from simulator.run import Record, Simulation
from simulator.scenario import Fleet, Scenario
from simulator.sink import Sink


def simulation(tmp_path: Path) -> Simulation:
    sim = Simulation(Scenario(name="shown", fleet=Fleet(count=3)), tmp_path)
    sim.sink = Sink("a-secret-of-enough-length", tmp_path / "centre.db")
    sim.observed.records["msg-00001"] = Record("msg-00001", "sim-bell-00001", "alert", "press", 0)
    return sim


def test_without_a_terminal_it_prints_a_line(tmp_path: Path) -> None:
    out = io.StringIO()
    display = Display(Console(file=out, width=200), live=False)
    with display:
        display.update(simulation(tmp_path))
    line = out.getvalue()
    assert "connected 0/3" in line and "alerts sent 1" in line and "waiting 1" in line


def test_on_a_terminal_it_draws_a_table(tmp_path: Path) -> None:
    out = io.StringIO()
    display = Display(Console(file=out, width=80, force_terminal=True), live=True)
    with display:
        display.update(simulation(tmp_path))
    assert "ansimi sim: shown" in out.getvalue() and "at the centre" in out.getvalue()
