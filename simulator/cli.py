"""`ansimi sim ...`: run a scenario against real agents, a gateway process and a centre sink."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ansimi.config import ConfigError
from ansimi.config import broker_address as parse_broker_address

SHIPPED = Path(__file__).parent / "scenarios"


@click.group()
def sim() -> None:
    """Run simulated fleets and scenarios."""


@sim.command("list")
def list_scenarios() -> None:
    """The scenarios shipped with the simulator."""
    from simulator.scenario import load_scenario

    for path in sorted(SHIPPED.glob("*.toml")):
        scenario = load_scenario(path)
        click.echo(f"{path.stem:28} {scenario.description}")


def _resolve(scenario: str) -> Path:
    path = Path(scenario)
    if path.exists():
        return path
    shipped = SHIPPED / f"{scenario.removesuffix('.toml')}.toml"
    if shipped.exists():
        return shipped
    raise click.BadParameter(
        f"no file {scenario} and no shipped scenario of that name (see `ansimi sim list`)",
        param_hint="--scenario",
    )


@sim.command("run")
@click.option(
    "--scenario",
    "scenario_name",
    required=True,
    help="a scenario TOML file, or the name of a shipped one",
)
@click.option(
    "--devices",
    type=click.IntRange(1, 20_000),
    default=None,
    help="fleet size (default: the scenario's)",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=Path("sim-report"),
    show_default=True,
    help="folder for summary.json, index.html and plots",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0.001, max=100),
    default=None,
    help="multiply every scenario time by this (0.0167: ten minutes in ten seconds)",
)
@click.option("--seed", type=int, default=None, help="override the scenario's seed")
@click.option(
    "--workers", type=click.IntRange(1, 16), default=None, help="worker processes for the agents"
)
@click.option(
    "--broker",
    "broker_address",
    default=None,
    metavar="HOST:PORT",
    help="use this running broker (plain MQTT, anonymous) instead of starting mosquitto",
)
@click.option("--live/--no-live", default=None, help="live progress (default: on a terminal)")
def run(
    scenario_name: str,
    devices: int | None,
    report_dir: Path,
    time_scale: float | None,
    seed: int | None,
    workers: int | None,
    broker_address: str | None,
    live: bool | None,
) -> None:
    """Run a scenario; exit 1 if any alert is lost or a threshold fails."""
    from simulator.report import summarise, write
    from simulator.run import SimError, Simulation
    from simulator.scenario import load_scenario

    try:
        scenario = load_scenario(
            _resolve(scenario_name),
            devices=devices,
            time_scale=time_scale,
            seed=seed,
            workers=workers,
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    console = Console(stderr=True)
    report_dir = report_dir.resolve()
    display = Display(console, live if live is not None else console.is_terminal)
    broker = None
    if broker_address is not None:
        try:
            broker = parse_broker_address(broker_address)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--broker") from None
    try:
        simulation = Simulation(scenario, report_dir, on_tick=display.update, broker=broker)
        with display:
            observed = asyncio.run(simulation.execute())
    except SimError as exc:
        raise click.ClickException(str(exc)) from None
    summary = summarise(observed)
    write(observed, summary, report_dir)
    a = summary["alerts"]
    lat = summary["latency_s"]["press_to_delivered"]
    click.echo(
        f"{summary['scenario']}: {summary['devices']} devices, {a['sent']} alerts sent, "
        f"{a['delivered_at_centre']} at the centre, {a['lost']} lost, "
        f"{a['duplicate_deliveries']} duplicate deliveries; "
        f"press to centre p95 {lat['p95']} s; report in {report_dir}"
    )
    for failure in summary["failures"]:
        click.echo(f"FAIL: {failure}", err=True)
    sys.exit(0 if summary["passed"] else 1)


class Display:
    """Live progress with rich on a terminal; a line every few seconds elsewhere (CI logs)."""

    def __init__(self, console: Console, live: bool) -> None:
        self.console = console
        self.live = Live(console=console, refresh_per_second=4) if live else None
        self._last_line = 0.0

    def __enter__(self) -> Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, sim: object) -> None:
        from simulator.run import Simulation

        assert isinstance(sim, Simulation)
        o = sim.observed
        elapsed = max(0.0, time.time() - o.t0) if o.t0 else 0.0
        total = len(sim.plan.devices)
        sent = len(o.records)
        at_sink = sim.at_sink()
        figures = {
            "phase": sim.phase,
            "elapsed": f"{elapsed:6.1f} s / {sim.scenario.scaled(sim.scenario.duration_s):g} s",
            "connected": f"{sim.connected}/{total}",
            "alerts sent": str(sent),
            "received (device)": str(sim.received()),
            "at the centre": str(at_sink),
            "waiting": str(sent - at_sink),
            "faults": "; ".join(m.label for m in o.marks) or "-",
        }
        if self.live is not None:
            table = Table(title=f"ansimi sim: {sim.scenario.name}", show_header=False)
            for key, value in figures.items():
                table.add_row(key, value)
            self.live.update(table)
        elif time.monotonic() - self._last_line >= 5:
            self._last_line = time.monotonic()
            self.console.print(" | ".join(f"{k} {v}" for k, v in figures.items()))
