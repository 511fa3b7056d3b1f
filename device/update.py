"""Agent updates: download, check, install beside the current version, switch, prove, commit.

Files under the update root (`[update] root`, /opt/ansimi by default):

    versions/<version>/     one installed agent each (`pip install --target` of a bundle's
                            wheels); a folder only gets its final name once complete
    current -> versions/v   what the launcher runs; only ever replaced by os.replace of a
                            new symlink, so it always names a complete version
    update.json             the journal: which step an update is at (written atomically)
    download/               the bundle being fetched (`.part`, resumed) and the checked one

An update moves through the steps of a table (`STEPS`), each one durable before the next
begins, so a power cut at any point resumes (or undoes) it on the next start:

    downloading -> downloaded -> installed -> trial --commit--> (journal removed)
                                                    \\--fail---> rolled_back -> (reported)

A failure before `trial` only drops the journal (the running version never changed). In
`trial` the new version runs: the launcher (`boot`, run by systemd before each start)
counts its starts and switches back once it has started too often or its deadline has
passed; the agent commits once the health check passes (`Trial`). Nothing here starts
while an incident is open (the agent's decision: `Agent.on_command`).
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ansimi.bundle import MAX_BUNDLE_BYTES, extract_wheels, read_bundle
from ansimi.files import fsync_dir, write_atomic
from device.errors import DeviceError
from protocol.ids import new_message_id
from protocol.messages import Ack, Health
from protocol.release import ReleaseRefused, Version, check_replaces

if TYPE_CHECKING:
    from device.agent import Agent

log = logging.getLogger(__name__)

# systemd restarts the agent on this exit status (RestartForceExitStatus= in the unit): the
# agent asks for it after switching to a new version, or back to the old one
RESTART_EXIT_CODE: Final = 75
JOURNAL_NAME: Final = "update.json"
CURRENT_NAME: Final = "current"
VERSIONS_DIR: Final = "versions"
DOWNLOAD_DIR: Final = "download"

Step = Literal["downloading", "downloaded", "installed", "trial", "rolled_back"]
# the table: what each step does next, and where it goes on success
STEPS: Final[dict[Step, Step | None]] = {
    "downloading": "downloaded",  # fetch with resume, check the signature and every hash
    "downloaded": "installed",  # extract, pip install into a new folder, rename it in place
    "installed": "trial",  # journal the trial, switch `current`, restart
    "trial": None,  # the launcher counts starts; the agent commits or rolls back
    "rolled_back": None,  # the old version runs again: report update_failed, then forget
}
# the steps an offer of the same version resumes rather than refuses
STEPS_BEFORE_TRIAL: Final = ("downloading", "downloaded", "installed")


# a download cut by these is dropped, not kept for a resume
_DISK_FULL: Final = (errno.ENOSPC, errno.EDQUOT)


class UpdateFailed(DeviceError, RuntimeError):
    """An update that cannot go on; ``reason`` is one token for the report, the text for logs."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Journal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    step: Step
    version: Version
    url: Annotated[str, StringConstraints(max_length=256)]
    previous: Version  # the version that ran when the update began: the one to go back to
    deadline_ms: int | None = None  # trial: the health check must pass by then
    boots: Annotated[int, Field(ge=0)] = 0  # trial: starts of the new version so far
    reason: Annotated[str, StringConstraints(max_length=160)] | None = None  # rolled_back


Fetch = Callable[[str, Path], Awaitable[None]]
"""Fetch ``url`` into ``path``, resuming from the bytes already in it."""
Install = Callable[[Sequence[Path], Path], Awaitable[None]]
"""Install ``wheels`` into the (new, empty) folder ``target``."""
Checkpoint = Callable[[str], None]
"""Called after each durable point (the SIGKILL tests stop the process at each)."""


def _no_checkpoint(_name: str) -> None:
    pass


# set by the launcher (`launch_environment`): the version folder the agent runs from
VERSION_ENV: Final = "ANSIMI_AGENT_VERSION"


def launched_version() -> str | None:
    return os.environ.get(VERSION_ENV)


# the agent's distribution: its version is what a device without an update root runs
DISTRIBUTION: Final = "ansimi-edge"


def agent_version(updater: Updater | None) -> str:
    """The agent version this process runs (the heartbeat's `firmware`): the version folder
    the update launcher started it from, else the installed distribution's version. Read
    once at start: `current` may name a newer version before the restart into it."""
    launched = updater.running() if updater is not None else launched_version()
    if launched:
        return launched
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"  # run from a source tree that was never installed


@dataclass(frozen=True, slots=True)
class Outcome:
    """What `Updater.advance` left: nothing to do, a version ready to switch to, or a
    failure to report."""

    ready: bool = False
    failed: UpdateFailed | None = None


class Updater:
    """One device's update root and journal. Every method may run again after a crash."""

    def __init__(
        self,
        root: Path,
        release_key: Ed25519PublicKey,
        *,
        fetch: Fetch,
        install: Install,
        clock_ms: Callable[[], int],
        trial_s: float = 120.0,
        max_trial_boots: int = 3,
        checkpoint: Checkpoint = _no_checkpoint,
        durable: bool = True,
        running: Callable[[], str | None] = launched_version,
    ) -> None:
        self.root = root
        # the version whose code this process runs (None: not started by the launcher);
        # only that version's trial may be committed by it
        self.running = running
        self.release_key = release_key
        self._fetch = fetch
        self._install = install
        self.clock_ms = clock_ms
        self.trial_s = trial_s
        self.max_trial_boots = max_trial_boots
        self._checkpoint = checkpoint
        self._durable = durable

    # ---- files ---------------------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        return self.root / JOURNAL_NAME

    def version_dir(self, version: str) -> Path:
        return self.root / VERSIONS_DIR / version

    def _part(self, version: str) -> Path:
        return self.root / DOWNLOAD_DIR / f"{version}.bundle.part"

    def _bundle(self, version: str) -> Path:
        return self.root / DOWNLOAD_DIR / f"{version}.bundle"

    def installed_version(self) -> str:
        """The version `current` names: the one the launcher runs."""
        try:
            return os.readlink(self.root / CURRENT_NAME).rsplit("/", 1)[-1]
        except OSError:
            raise UpdateFailed(
                "not_set_up",
                f"no {self.root / CURRENT_NAME} symlink: this device was not installed for "
                "updates (the installer makes versions/<version> and the link)",
            ) from None

    def journal(self) -> Journal | None:
        try:
            return Journal.model_validate_json(self.journal_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            # written atomically, so this is a damaged disk: the running version is whole
            # (`current` names a complete folder), so forget the update rather than stop
            log.error("update journal %s unreadable (%s): update forgotten", self.journal_path, exc)
            self._forget()
            return None

    def _write(self, journal: Journal) -> None:
        write_atomic(self.journal_path, journal.model_dump_json().encode(), durable=self._durable)
        self._checkpoint(journal.step)

    def _forget(self, *, keep_download: bool = False) -> None:
        self.journal_path.unlink(missing_ok=True)
        if not keep_download:
            shutil.rmtree(self.root / DOWNLOAD_DIR, ignore_errors=True)
        self._sync(self.root)

    def _sync(self, folder: Path) -> None:
        if self._durable:
            fsync_dir(folder)

    def _point_current_at(self, version: str) -> None:
        """Replace `current` by a link to `versions/<version>` in one rename."""
        link = self.root / CURRENT_NAME
        tmp = self.root / f".{CURRENT_NAME}.{uuid.uuid4().hex}.tmp"
        os.symlink(f"{VERSIONS_DIR}/{version}", tmp)
        os.replace(tmp, link)
        self._sync(self.root)

    # ---- steps ---------------------------------------------------------------------------

    def start(self, version: str, url: str) -> Journal:
        """Begin an update to ``version`` from ``url``; refuse if one is under way."""
        ongoing = self.journal()
        if ongoing is not None:
            if ongoing.step in STEPS_BEFORE_TRIAL and ongoing.version == version:
                return ongoing  # offered again (it was quiet): resume it, keep its download
            raise UpdateFailed(
                "busy", f"an update to {ongoing.version} is at step {ongoing.step} already"
            )
        journal = Journal(
            step="downloading", version=version, url=url, previous=self.installed_version()
        )
        (self.root / DOWNLOAD_DIR).mkdir(exist_ok=True)
        self._write(journal)
        return journal

    async def advance(self) -> Outcome:
        """Run the journal's steps up to `installed`; a failure on the way drops the update.
        The switch is `switch()`'s, so the agent can choose its moment (no open incident)."""
        while (journal := self.journal()) is not None:
            try:
                if journal.step == "downloading":
                    await self._download(journal)
                elif journal.step == "downloaded":
                    await self._install_version(journal)
                else:
                    return Outcome(ready=journal.step == "installed")
            except (UpdateFailed, OSError) as exc:
                # a full or failing disk too: raised out of the agent, the same step would
                # fail again at every start and keep the bell from running at all
                failed = (
                    exc
                    if isinstance(exc, UpdateFailed)
                    else UpdateFailed("storage_failed", f"{type(exc).__name__}: {exc}")
                )
                log.warning("update to %s failed at %s: %s", journal.version, journal.step, failed)
                # a cut download stays: the next offer resumes it (a bad one was deleted)
                self._drop(journal, keep_download=failed.reason == "download_failed")
                return Outcome(failed=failed)
        return Outcome()

    async def _download(self, journal: Journal) -> None:
        part = self._part(journal.version)
        try:
            await self._fetch(journal.url, part)
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                # not kept for a resume: the outbox needs that space more
                raise UpdateFailed("storage_failed", f"fetching {journal.url}: {exc}") from None
            # the part stays: the next offer resumes it
            raise UpdateFailed("download_failed", f"fetching {journal.url}: {exc}") from None
        self._checkpoint("fetched")
        try:
            manifest = read_bundle(part, self.release_key).manifest
            if manifest.version != journal.version:
                raise ReleaseRefused(
                    "malformed", f"bundle is {manifest.version}, offered as {journal.version}"
                )
            check_replaces(manifest, journal.previous)
        except ReleaseRefused as exc:
            part.unlink(missing_ok=True)  # a bad download is not resumed
            raise UpdateFailed(exc.reason, str(exc)) from None
        os.replace(part, self._bundle(journal.version))
        self._sync(part.parent)
        self._write(journal.model_copy(update={"step": "downloaded"}))

    async def _install_version(self, journal: Journal) -> None:
        final = self.version_dir(journal.version)
        if not final.exists():  # a crash after the rename below finds it done
            versions = final.parent
            partial = versions / f".{journal.version}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # a crash mid-install leaves this
            wheels = partial / "wheels"
            wheels.mkdir(parents=True)
            try:
                bundle = read_bundle(self._bundle(journal.version), self.release_key)
                written = extract_wheels(bundle, wheels)
            except (ReleaseRefused, OSError) as exc:
                shutil.rmtree(partial, ignore_errors=True)
                raise UpdateFailed(getattr(exc, "reason", "install_failed"), str(exc)) from None
            self._checkpoint("extracted")
            site = partial / "site"
            await self._install(written, site)
            self._checkpoint("pip_done")
            shutil.rmtree(wheels)
            os.replace(partial, final)
            self._sync(versions)
        self._write(journal.model_copy(update={"step": "installed"}))

    def switch(self) -> Journal:
        """Journal the trial and point `current` at the installed version; restart next."""
        journal = self.journal()
        if journal is None or journal.step != "installed":
            raise UpdateFailed("not_installed", f"no installed update to switch to: {journal}")
        # the journal first: a crash before the link changes leaves a trial the launcher
        # completes (it points `current` at the version the journal names)
        deadline = self.clock_ms() + int(self.trial_s * 1000)
        self._write(journal.model_copy(update={"step": "trial", "deadline_ms": deadline}))
        self._point_current_at(journal.version)
        self._checkpoint("switched")
        return journal

    def _drop(self, journal: Journal, *, keep_download: bool = False) -> None:
        shutil.rmtree(self.root / VERSIONS_DIR / f".{journal.version}.partial", ignore_errors=True)
        if journal.version != self.installed_version():
            shutil.rmtree(self.version_dir(journal.version), ignore_errors=True)
        self._forget(keep_download=keep_download)

    # ---- the launcher's part: each start, before the agent's code is imported -----------

    def boot(self) -> Path:
        """Settle the journal before a start; return the folder of the version to run.

        In a trial, each start is counted; too many, or a start past the deadline, switch
        back to the previous version (a new version that cannot even start never gets to
        roll itself back: this runs from the launcher, not from it).
        """
        journal = self.journal()
        if journal is not None and journal.step == "trial":
            boots = journal.boots + 1
            if boots > self.max_trial_boots:
                self.roll_back(journal, f"did not pass its health check in {boots - 1} starts")
            elif journal.deadline_ms is not None and self.clock_ms() > journal.deadline_ms:
                self.roll_back(journal, f"health check not passed within {self.trial_s:g} s")
            else:
                self._write(journal.model_copy(update={"boots": boots}))
                self._point_current_at(journal.version)  # a crash may have come before it
        elif journal is not None and journal.step == "rolled_back":
            self._point_current_at(journal.previous)  # idem
        return self.root / CURRENT_NAME

    # ---- the agent's part ----------------------------------------------------------------

    def commit(self, journal: Journal) -> None:
        """The new version proved itself: forget the journal and versions older than previous."""
        keep = {journal.version, journal.previous}
        self._forget()
        versions = self.root / VERSIONS_DIR
        for folder in versions.iterdir():
            if folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        log.warning("update to %s committed", journal.version)

    def roll_back(self, journal: Journal, reason: str) -> None:
        """Go back to the previous version; the next start of it reports why."""
        self._write(journal.model_copy(update={"step": "rolled_back", "reason": reason[:160]}))
        self._point_current_at(journal.previous)
        log.error("update to %s rolled back to %s: %s", journal.version, journal.previous, reason)

    def reported(self, journal: Journal) -> None:
        """The rollback has been reported (kept in the outbox): drop the failed version."""
        self._drop(journal)


# ---- the real fetch and install ------------------------------------------------------------


def http_fetch(
    session: aiohttp.ClientSession, *, timeout_s: float = 600.0, max_bytes: int = MAX_BUNDLE_BYTES
) -> Fetch:
    """Fetch over HTTP(S) with `Range`, appending to what an earlier attempt left; a file
    growing past `max_bytes` is deleted and refused (the disk also holds the outbox)."""

    async def fetch(url: str, path: Path) -> None:
        have = path.stat().st_size if path.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with (
            asyncio.timeout(timeout_s),
            session.get(url, headers=headers) as response,
        ):
            if response.status == 416:  # nothing left to send: the part is whole
                return
            response.raise_for_status()
            # 206: the rest; 200: a server that ignores Range sends it all again
            mode = "ab" if response.status == 206 else "wb"
            size = have if mode == "ab" else 0
            with path.open(mode) as out:
                async for chunk in response.content.iter_chunked(64 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        out.close()
                        path.unlink(missing_ok=True)
                        raise UpdateFailed("too_large", f"{url} sends over {max_bytes} bytes")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())

    return fetch


async def pip_install(wheels: Sequence[Path], target: Path) -> None:
    """`pip install --target` the wheels, offline: the base install has the dependencies."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--disable-pip-version-check",
        "--target",
        str(target),
        *map(str, wheels),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise UpdateFailed("install_failed", f"pip install exited {process.returncode}: {tail[0]}")


def launch_environment(current: Path, environ: dict[str, str]) -> dict[str, str]:
    """The environment the agent starts in: the current version's folder first on the
    path, and its version named, so a trial commits only the version that really ran."""
    version_dir = current.resolve()
    site = str(version_dir / "site")
    path = environ.get("PYTHONPATH")
    env = dict(environ)
    env["PYTHONPATH"] = site if not path else f"{site}{os.pathsep}{path}"
    env[VERSION_ENV] = version_dir.name
    return env


# ---- the agent's side: the `update` command, the trial's health check ----------------------


NOT_SET_UP_TEXT: Final = "no [update] root in device.toml: this device takes no updates"


def refused_update(version: object, reason: str, text: str = NOT_SET_UP_TEXT) -> Health:
    """The `update_failed` report: `<version> <reason>: <what happened>` (the gateway reads
    the version and the reason; the rest is for people)."""
    shown = version if isinstance(version, str) else "?"
    return Health(event="update_failed", detail=f"{shown} {reason}: {text}"[:200])


class RestartRequested(DeviceError, RuntimeError):
    """Raised out of the agent's task group: the CLI exits RESTART_EXIT_CODE and systemd
    starts the launcher again, which runs whatever `current` now names."""


class UpdateService:
    """Takes `update` commands, runs the steps, and proves (or fails) a trial after a start.

    The health check of a trial, all before the journal's deadline: connected to the broker,
    the self-test passing, then a kept message (the `update_installed` report) acknowledged
    `received` by the gateway, so the whole signed path up and down works.
    """

    def __init__(
        self,
        agent: Agent,
        updater: Updater,
        *,
        busy_poll_s: float = 1.0,
    ) -> None:
        self.agent = agent
        self.updater = updater
        self._busy_poll_s = busy_poll_s
        self._wake = asyncio.Event()
        self._acked: set[str] = set()
        self._ack_seen = asyncio.Event()
        agent.on_ack.append(self._on_ack)

    def _on_ack(self, ack: Ack) -> None:
        if ack.stage == "received":
            self._acked.add(ack.ref)
            self._ack_seen.set()

    def _failed(self, version: str, reason: str, text: str) -> None:
        self.agent.report(refused_update(version, reason, text))

    def offer(self, version: object, url: object) -> None:
        """The gateway's `update` command. Refused during an incident or another update."""
        if not isinstance(version, str) or not isinstance(url, str):
            log.warning("device %s: update needs string `version` and `url`", self.agent.device_id)
            return
        if self.agent.behaviour.incident is not None:
            self._failed(version, "incident_open", "an incident is open: offer it again later")
            return
        try:
            if self.updater.journal() is None and version == self.updater.installed_version():
                # what runs already: the report crossed this offer, or was lost at the gateway
                # (offered again after reoffer_s of silence); said again, so its rollout learns
                log.info("device %s: update %s runs already", self.agent.device_id, version)
                self.agent.report(Health(event="update_installed", detail=version))
                return
            self.updater.start(version, url)
        except (UpdateFailed, ValidationError) as exc:
            reason = exc.reason if isinstance(exc, UpdateFailed) else "malformed"
            self._failed(version, reason, str(exc).splitlines()[0])
            return
        self._wake.set()

    async def run(self) -> None:
        """Resume what the journal says, then wait for offers; raises RestartRequested."""
        journal = self.updater.journal()
        if journal is not None and journal.step == "trial":
            await self._prove(journal)
        elif journal is not None and journal.step == "rolled_back":
            self._failed(journal.version, "rolled_back", journal.reason or "")
            self.updater.reported(journal)  # kept in the outbox: the report is safe
        while True:
            await self._advance()
            await self._wake.wait()
            self._wake.clear()

    async def _advance(self) -> None:
        journal = self.updater.journal()
        if journal is None:
            return
        outcome = await self.updater.advance()
        if outcome.failed is not None:
            self._failed(journal.version, outcome.failed.reason, str(outcome.failed))
        if outcome.ready:
            await self._idle()
            try:
                self.updater.switch()
            except OSError as exc:
                after = self.updater.journal()
                if after is None or after.step != "installed":
                    raise  # the trial is journaled: the launcher finishes the switch
                # the trial could not be journaled (a full disk): raised out of the agent,
                # the switch would fail again at every start; dropped, it frees the space
                self._failed(journal.version, "storage_failed", f"{type(exc).__name__}: {exc}")
                self.updater.reported(after)
                return
            raise RestartRequested(f"switched to {journal.version}: restarting into it")

    async def _idle(self) -> None:
        """Until no incident is open: a restart now would interrupt what the person sees.
        The behaviour has no event for an incident's end; a look a second costs nothing."""
        while self.agent.behaviour.incident is not None:  # noqa: ASYNC110
            await asyncio.sleep(self._busy_poll_s)

    async def _prove(self, journal: Journal) -> None:
        assert journal.deadline_ms is not None
        # capped: a clock set back (a Pi without a clock of its own, before NTP) must not
        # stretch the trial
        left_ms = min(journal.deadline_ms - self.updater.clock_ms(), self.updater.trial_s * 1000)
        stage = "connection to the broker"
        try:
            if self.updater.running() != journal.version:
                # started some other way than by the launcher: what runs is not the new
                # version, so passing the check would commit code that never ran
                raise UpdateFailed(
                    "not_launched",
                    f"the agent runs {self.updater.running() or 'unknown code'}, not "
                    f"{journal.version}: start it with `ansimi device launch` (systemd unit)",
                )
            async with asyncio.timeout(max(0.0, left_ms / 1000)):
                await self.agent.ready.wait()
                stage = "self-test result"
                if not await self.agent.selftest():
                    raise UpdateFailed("selftest", "the self-test failed")
                # last, so that the gateway hearing it means all the rest passed: it counts
                # the device as updated; its acknowledgement proves the path both ways
                stage = "acknowledged report"
                report_id = new_message_id()
                self.agent.report(
                    Health(event="update_installed", detail=journal.version), report_id
                )
                while report_id not in self._acked:
                    self._ack_seen.clear()
                    await self._ack_seen.wait()
        except (TimeoutError, UpdateFailed) as exc:
            why = str(exc) if isinstance(exc, UpdateFailed) else f"no {stage} in time"
            self.updater.roll_back(journal, f"health check failed: {why}")
            await self._idle()
            raise RestartRequested(f"rolled back from {journal.version}") from None
        self.updater.commit(journal)
