"""Agent rollouts during a simulator run, done the way a site does them, and their verdict.

`ReleaseSite` makes the run's release key and bundles with the installer's own commands
(`ansimi provision release key init`, `release build`), of tiny real wheels whose module
says its version (simulator/updates.py); a release marked `selftest_fails` makes every bell
fail its self-test. `RolloutDriver` adds them to the gateway (`release add`) and rolls each
out in its steps (`rollout start`, then `rollout resume --percent` once a step is done),
reading the rollout's state from the admin API. Each command is a subprocess of the real
CLI against the gateway's real API, so what is proven is what an installer would run.

`rollout_summary` puts the figures (seconds per step, offers, rollbacks, presses during
each release) beside what the bells themselves ran at the end, and `rollout_failures`
judges: a good release done on every bell of its steps, a broken one paused with every
bell it reached rolled back, no bell left on a broken version or midway, every bell on the
version its rollouts promised, and presses made during each rollout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

from ansimi.files import write_atomic
from simulator.errors import SimulatorError
from simulator.messages import Performed
from simulator.scenario import Release, Rollout
from simulator.updates import SELFTEST_FAILS, probe_wheel

log = logging.getLogger(__name__)

CLI_TIMEOUT_S: Final = 120.0  # one command: Python's start-up on a loaded machine, the upload
POLL_S: Final = 0.5
# a press the workers have not reported done by then is pressed again on another bell
PRESS_SEEN_S: Final = 3.0
# a device's report of a release it ran and went back from (device/update.py)
ROLLED_BACK: Final = "rolled_back"


class RolloutError(SimulatorError, RuntimeError):
    """An installer's command failed: its output says why."""


@dataclass(slots=True)
class StepSeen:
    """One step of a rollout: started (or widened) to `percent`, then done, paused, or
    still running when its time was up."""

    percent: float
    started_at: float  # wall clock
    seconds: float = 0.0
    state: str = "running"
    devices: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    offers: int = 0  # more than one a device: offers lost and made again


@dataclass(slots=True)
class ReleaseSeen:
    """One release's rollout, as the gateway's admin API told it."""

    version: str
    selftest_fails: bool
    started_at: float = 0.0
    ended_at: float = 0.0
    steps: list[StepSeen] = field(default_factory=list)
    state: str = "not started"
    paused_because: str | None = None
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> its progress
    error: str | None = None  # a command that failed, or a step out of time


class Cli:
    """`ansimi provision ...` as an installer runs it, with `--json`; bounded in time."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path

    async def __call__(self, *args: str) -> dict[str, Any]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ansimi_edge",
            "provision",
            *args,
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            async with asyncio.timeout(CLI_TIMEOUT_S):
                out, err = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RolloutError(
                f"`ansimi provision {' '.join(args)}` took over {CLI_TIMEOUT_S:g} s"
            ) from None
        with self.log_path.open("a") as handle:
            handle.write(
                f"$ ansimi provision {' '.join(args)} --json\n{out.decode()}{err.decode()}"
            )
        if process.returncode != 0:
            said = (out.decode().strip() or err.decode().strip()).splitlines()[-1:] or ["nothing"]
            raise RolloutError(
                f"`ansimi provision {' '.join(args)}` exited {process.returncode}: {said[0]}"
            )
        answer: dict[str, Any] = json.loads(out)
        return answer


class ReleaseSite:
    """The run's release key and signed bundles, in a site folder of their own."""

    def __init__(self, folder: Path, cli: Cli) -> None:
        self.folder = folder
        self.cli = cli
        self.public_key = ""
        self.bundles: dict[str, Path] = {}

    async def prepare(self, rollout: Rollout) -> None:
        """`release key init`, then a bundle per release (`release build`)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        made = await self.cli("release", "key", "init", "--dir", str(self.folder))
        self.public_key = made["public_key"]
        for release in rollout.releases:
            wheels = self.folder / f"wheels-{release.version}"
            wheels.mkdir()
            code = f"{SELFTEST_FAILS}\n" if release.selftest_fails else ""
            wheel = probe_wheel(wheels, release.version, extra=code)
            out = self.folder / f"ansimi-{release.version}.bundle"
            await self.cli(
                "release", "build", "--dir", str(self.folder), "--version", release.version,
                "--min-version", rollout.installed, "--out", str(out), str(wheel),
            )  # fmt: skip
            self.bundles[release.version] = out


class RolloutDriver:
    """Rolls the scenario's releases out one after the other, step by step."""

    def __init__(
        self,
        plan: Rollout,
        site: ReleaseSite,
        http: aiohttp.ClientSession,
        api_url: str,
        token_file: Path,
        *,
        press: Callable[[list[str]], Awaitable[None]],
        presses_since: Callable[[float, Collection[str]], int],
        seed: int,
    ) -> None:
        self.plan = plan
        self.site = site
        self.http = http
        self.api_url = api_url
        self.token_file = token_file
        self.press = press  # has the simulated people press these bells now
        # presses of these bells the workers report done at or after a time (a bell whose
        # agent is restarting into or out of a release is not pressed: nobody is counted)
        self.presses_since = presses_since
        self.seed = seed
        self.seen: list[ReleaseSeen] = []

    @staticmethod
    def write_token(path: Path, token: str) -> None:
        """The admin token in a file only we read: the gateway's [[api.tokens]] entry and
        the CLI's --admin-token-file both name it (never a command-line argument)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, token.encode() + b"\n", mode=0o600)

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def _gateway(self) -> list[str]:
        return ["--gateway", self.api_url, "--admin-token-file", str(self.token_file)]

    async def add_releases(self) -> None:
        for version, bundle in self.site.bundles.items():
            await self.site.cli("release", "add", str(bundle), *self._gateway())
            log.info("simulator: release %s added", version)

    async def run(self) -> None:
        """Every release in turn; a failure is kept in what was seen, for the verdict."""
        for n, release in enumerate(self.plan.releases):
            seen = ReleaseSeen(release.version, release.selftest_fails)
            self.seen.append(seen)
            try:
                if n and self.seen[n - 1].state == "paused":
                    # one rollout at a time: a paused one is aborted before the next
                    await self.site.cli("rollout", "abort", *self._gateway())
                await self._roll_out(release, seen)
            except (RolloutError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                seen.error = str(exc) or type(exc).__name__
            finally:
                seen.ended_at = time.time()
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    self._remember(seen, await self.status())
            if seen.error is not None or (not release.selftest_fails and seen.state != "done"):
                return  # the next would not start (one rollout at a time): judged as it is

    async def _roll_out(self, release: Release, seen: ReleaseSeen) -> None:
        seen.started_at = time.time()
        for n, percent in enumerate(release.steps):
            step = StepSeen(percent, time.time())
            seen.steps.append(step)
            if n == 0:
                await self.site.cli(
                    "rollout", "start", release.version, "--district", self.plan.district,
                    "--percent", f"{percent:g}", *self._gateway(),
                )  # fmt: skip
            else:
                await self.site.cli(
                    "rollout", "resume", "--percent", f"{percent:g}", *self._gateway()
                )
            try:
                async with asyncio.timeout(self.plan.step_timeout_s):
                    await self._press_some(release, percent)
                    current = await self._until_step_ends(release)
            except TimeoutError:
                current = (await self.status()) or {}
                seen.error = (
                    f"step {percent:g}% of {release.version} not over in "
                    f"{self.plan.step_timeout_s:g} s"
                )
            step.seconds = round(time.time() - step.started_at, 2)
            step.state = current.get("state", "missing")
            devices = current.get("devices", {})
            step.devices = len(devices)
            step.counts = _counts(devices.values())
            step.offers = sum(p["offers"] for p in devices.values())
            self._remember(seen, current)
            if seen.error is not None or step.state != "done":
                return

    async def _press_some(self, release: Release, percent: float) -> None:
        """Press a few of the bells this step has offered the release to, until one of
        those presses is done (within the step's own time limit, the caller's).

        Bells still busy with the offer first; else bells it is over for (a broken release
        fails everywhere in a fraction of a second here, and is paused before a first look
        sees one offered). A bell restarting into or out of a release when the press comes
        is not pressed (not counted): this presses again until the workers report a press
        of the bells it chose.
        """
        if not self.plan.presses_per_step:
            return
        since = time.time()
        rng = random.Random(f"{self.seed}/{release.version}/{percent:g}")
        pressed: set[str] = set()
        while not self.presses_since(since, pressed):
            current = await self.status()
            if current is None or current.get("version") != release.version:
                return
            devices = current["devices"]
            offered = sorted(d for d, p in devices.items() if p["state"] == "offered")
            touched = sorted(d for d, p in devices.items() if p["state"] != "pending")
            choice = offered or touched
            if not choice and current["state"] != "running":
                return  # over without offering it to anyone: nothing to press
            chosen = rng.sample(choice, min(len(choice), self.plan.presses_per_step))
            if chosen:
                pressed.update(chosen)
                await self.press(chosen)
                await asyncio.sleep(PRESS_SEEN_S)  # the workers report every 0.25 s
            else:
                await asyncio.sleep(POLL_S)

    async def _until_step_ends(self, release: Release) -> dict[str, Any]:
        """Until the step is done or paused; a broken release's also until every bell it
        was offered to has answered (rolled back), so its verdict sees them all."""
        while True:
            current = await self.status()
            if current is not None and current["state"] != "running":
                offered = _counts(current["devices"].values())["offered"]
                if not release.selftest_fails or current["state"] != "paused" or not offered:
                    return current
            await asyncio.sleep(POLL_S)

    async def status(self) -> dict[str, Any] | None:
        """The current rollout from `GET /admin/rollouts` (polled: the CLI's start-up each
        half second would be the run's main load)."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        async with self.http.get(
            f"{self.api_url}/admin/rollouts",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response:
            response.raise_for_status()
            current: dict[str, Any] | None = (await response.json())["current"]
            return current

    @staticmethod
    def _remember(seen: ReleaseSeen, current: dict[str, Any] | None) -> None:
        if current is None or current.get("version") != seen.version:
            return
        seen.state = current["state"]
        seen.paused_because = current.get("paused_because")
        seen.devices = dict(current.get("devices", {}))


def _counts(progress: Iterable[dict[str, Any]]) -> dict[str, int]:
    counted = dict.fromkeys(("pending", "offered", "installed", "failed"), 0)
    for p in progress:
        counted[p["state"]] = counted.get(p["state"], 0) + 1
    return counted


# ---- figures and verdict ------------------------------------------------------------------


def expected_versions(
    installed: str, seen: list[ReleaseSeen], devices: Iterable[str]
) -> dict[str, str]:
    """What each bell should run at the end: the last good release its rollout installed
    on it (the gateway heard its health check pass), else what it was installed with."""
    expected = dict.fromkeys(devices, installed)
    for release in seen:
        if release.selftest_fails:
            continue
        for device_id, progress in release.devices.items():
            if progress["state"] == "installed" and device_id in expected:
                expected[device_id] = release.version
    return expected


def rollout_summary(
    plan: Rollout,
    seen: list[ReleaseSeen],
    versions: dict[str, str],
    updating: list[str],
    restarts: int,
    performed: list[Performed],
    t0: float,
) -> dict[str, Any]:
    """The figures: per release and step, and what the bells ran at the end."""
    releases = []
    for release in seen:
        ended = release.ended_at or time.time()
        rolled_back = [
            d
            for d, p in release.devices.items()
            if p["state"] == "failed" and (p.get("reason") or "").startswith(ROLLED_BACK)
        ]
        releases.append(
            {
                "version": release.version,
                "selftest_fails": release.selftest_fails,
                "state": release.state,
                "paused_because": release.paused_because,
                "error": release.error,
                "started_at_s": round(release.started_at - t0, 2) if release.started_at else None,
                "seconds": round(ended - release.started_at, 2) if release.started_at else None,
                "steps": [
                    {
                        "percent": s.percent,
                        "devices": s.devices,
                        "seconds": s.seconds,
                        "state": s.state,
                        "counts": s.counts,
                        "offers": s.offers,
                    }
                    for s in release.steps
                ],
                "counts": _counts(release.devices.values()),
                "rolled_back": len(rolled_back),
                "presses_during": sum(
                    1 for _, _, at in performed if release.started_at <= at <= ended
                ),
                "devices": release.devices,
            }
        )
    expected = expected_versions(plan.installed, seen, versions)
    running: dict[str, int] = {}
    for version in versions.values():
        running[version] = running.get(version, 0) + 1
    return {
        "district": plan.district,
        "installed": plan.installed,
        "min_presses": plan.min_presses,
        "releases": releases,
        "running_at_end": dict(sorted(running.items())),
        "not_as_expected": {
            d: {"runs": v, "expected": expected[d]}
            for d, v in sorted(versions.items())
            if v != expected[d]
        },
        "left_midway": updating,
        "agent_restarts": restarts,
    }


def rollout_failures(summary: dict[str, Any], planned: list[Release]) -> list[str]:
    """Each way the rollout story was not told: named, with a few device ids."""
    fails: list[str] = []
    seen = {r["version"]: r for r in summary["releases"]}
    broken = {r.version for r in planned if r.selftest_fails}
    for release in planned:
        r = seen.get(release.version)
        if r is None:
            fails.append(f"release {release.version} was never rolled out")
            continue
        if r["error"]:
            fails.append(f"release {release.version}: {r['error']}")
        devices = r["devices"]
        if release.selftest_fails:
            if r["state"] != "paused":
                fails.append(
                    f"broken release {release.version}: the rollout is {r['state']}, not paused"
                )
            stuck = _few(d for d, p in devices.items() if p["state"] == "offered")
            if stuck:
                fails.append(
                    f"broken release {release.version}: offered and never answered: {stuck}"
                )
            not_back = _few(
                f"{d} ({p['state']}: {p.get('reason')})"
                for d, p in devices.items()
                if p["state"] == "installed"
                or (p["state"] == "failed" and not (p.get("reason") or "").startswith(ROLLED_BACK))
            )
            if not_back:
                fails.append(f"broken release {release.version}: not rolled back: {not_back}")
        else:
            last = release.steps[-1]
            reached = r["steps"][-1]["percent"] if r["steps"] else 0
            if r["state"] != "done" or reached != last:
                fails.append(
                    f"release {release.version}: the rollout is {r['state']} at {reached:g}% "
                    f"(should be done at {last:g}%)"
                    + (f": {r['paused_because']}" if r["paused_because"] else "")
                )
            missing = _few(d for d, p in devices.items() if p["state"] != "installed")
            if missing:
                fails.append(f"release {release.version}: not installed on {missing}")
        if r["presses_during"] < summary["min_presses"]:
            fails.append(
                f"release {release.version}: {r['presses_during']} presses during its rollout "
                f"(at least {summary['min_presses']}): press more "
                "([rollout] presses_per_step, events)"
            )
    on_broken = _few(d for d, e in summary["not_as_expected"].items() if e["runs"] in broken)
    if on_broken:
        fails.append(f"bells left on a broken release: {on_broken}")
    wrong = summary["not_as_expected"]
    if wrong:
        listed = _few(f"{d} runs {e['runs']}, not {e['expected']}" for d, e in wrong.items())
        fails.append(f"{len(wrong)} bells not on the version their rollouts installed: {listed}")
    if summary["left_midway"]:
        fails.append(
            f"bells with an update still under way at the end: {_few(summary['left_midway'])}"
        )
    return fails


def _few(items: Iterable[str], shown: int = 5) -> str:
    listed = list(items)
    if not listed:
        return ""
    more = f" and {len(listed) - shown} more" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more
