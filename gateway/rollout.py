"""Agent releases kept at the gateway, and staged rollouts of one to a district's devices.

`Releases` keeps bundles (ansimi/bundle.py) that verify with the site's release key, and
serves them to devices at `GET /releases/{version}` (public: a bundle is signed, not
secret; aiohttp's FileResponse answers `Range`, so a device resumes a cut download).

`Rollouts` runs one rollout at a time: a stable share (`percent`) of a district's devices,
chosen by a hash of the version and the device id (widening it keeps the devices already
chosen), each offered a signed `update` command, never while it has an open incident, and
offered again if it said nothing for `reoffer_s`. A device's reports (health events
`update_installed`, sent once its health check passed, and `update_failed`, see
device/update.py) move it on; a failure after `installed` (its acknowledgement lost, the
device rolled back) still counts. The rollout pauses
by itself once failures reach `pause_failed_pct` of its devices.

The state is in the store (`RolloutStore`), so every gateway instance on it sees the same
rollout, takes its devices' reports and may offer: each offer is claimed in the store first
(one transaction holding the rollout's row), so a device is offered by one instance once per
`reoffer_s`, and never while its bell has an open incident. A `rollout.json` an older
gateway kept beside the bundles is imported once, then renamed `rollout.json.imported`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ansimi.bundle import MAX_BUNDLE_BYTES, read_bundle, sha256_file
from ansimi.districts import check_district
from gateway.api import TOKEN_KEY, ApiRoute, _error, _op, _path_param
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.store import (
    DeviceUpdate,
    Incoming,
    RolloutRecord,
    RolloutStore,
    UpdateOutcome,
)
from protocol.messages import Command, Health
from protocol.release import Manifest, ReleaseRefused, Version

log = logging.getLogger(__name__)

STATE_FILE: Final = "rollout.json"
HISTORY_KEPT: Final = 20
# reasons a device gives that say "not now", not "broken": it is offered again later
NOT_NOW: Final = ("incident_open", "busy")

DeviceState = Literal["pending", "offered", "installed", "failed"]
RolloutState = Literal["running", "paused", "aborted", "done"]


class Progress(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: DeviceState = "pending"
    at_ms: int = 0
    offers: int = 0
    reason: str | None = None


class Rollout(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    version: Version
    district: str
    percent: Annotated[float, Field(gt=0, le=100)]
    state: RolloutState = "running"
    started_ms: int
    paused_because: str | None = None
    devices: dict[str, Progress] = {}

    def counts(self) -> dict[str, int]:
        counted = dict.fromkeys(("pending", "offered", "installed", "failed"), 0)
        for progress in self.devices.values():
            counted[progress.state] += 1
        return counted

    def summary(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"devices"}), "counts": self.counts()}

    @classmethod
    def of(cls, record: RolloutRecord, devices: Iterable[DeviceUpdate]) -> Rollout:
        return cls(
            id=record.rollout_id,
            version=record.version,
            district=record.district,
            percent=record.percent,
            state=record.state,
            started_ms=record.started_ms,
            paused_because=record.paused_because,
            devices={
                d.device_id: Progress(
                    state=d.state, at_ms=d.at_ms, offers=d.offers, reason=d.reason
                )
                for d in devices
            },
        )

    def record(self) -> RolloutRecord:
        return RolloutRecord(
            self.id,
            self.version,
            self.district,
            self.percent,
            self.state,
            self.started_ms,
            self.paused_because,
        )

    def device_updates(self) -> list[DeviceUpdate]:
        return [
            DeviceUpdate(device_id, p.state, p.at_ms, p.offers, p.reason)
            for device_id, p in self.devices.items()
        ]


class _State(BaseModel):
    """rollout.json as gateways before the store kept it (imported once)."""

    model_config = ConfigDict(extra="forbid")

    current: Rollout | None = None
    history: list[Rollout] = []


class RolloutRefused(GatewayError, ValueError):
    """A rollout request that cannot be done now; `status` is its HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Releases:
    """Bundles that verified with the release key, one file per version."""

    def __init__(self, folder: Path, release_key: Ed25519PublicKey) -> None:
        self.folder = folder
        self.release_key = release_key
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, version: str) -> Path:
        return self.folder / f"{version}.bundle"

    def manifest(self, version: str) -> Manifest | None:
        path = self.path(version)
        return read_bundle(path, self.release_key).manifest if path.exists() else None

    def add(self, upload: Path) -> Manifest:
        """Check an uploaded file and keep it under its version; raise ReleaseRefused if bad."""
        manifest = read_bundle(upload, self.release_key).manifest
        target = self.path(manifest.version)
        if target.exists() and sha256_file(target) != sha256_file(upload):
            # a version names one set of wheels for ever: devices may hold half of the old
            raise ReleaseRefused(
                "not_newer", f"release {manifest.version} is here already, with other content"
            )
        os.replace(upload, target)
        return manifest

    def manifests(self) -> list[Manifest]:
        found = []
        for path in sorted(self.folder.glob("*.bundle")):
            with contextlib.suppress(ReleaseRefused, OSError):
                found.append(read_bundle(path, self.release_key).manifest)
        return found


def chosen(devices: Iterable[str], version: str, percent: float) -> list[str]:
    """A stable share of `devices`: the same ones for a version whatever the percent, so a
    wider step keeps those already chosen; spread over the district, not by name."""
    ranked = sorted(devices, key=lambda d: hashlib.sha256(f"{version}/{d}".encode()).digest())
    return ranked[: math.ceil(len(ranked) * percent / 100)]


class Rollouts:
    def __init__(
        self,
        releases: Releases,
        store: RolloutStore,
        send: Callable[[str, Command], object],
        metrics: Metrics,
        *,
        public_url: str,
        pause_failed_pct: float,
        reoffer_ms: int,
        clock_ms: Callable[[], int],
        tick_s: float = 5.0,
    ) -> None:
        self.releases = releases
        self._store = store
        self._send = send
        self._metrics = metrics
        self._public_url = public_url.rstrip("/")
        self._pause_failed_pct = pause_failed_pct
        self._reoffer_ms = reoffer_ms
        self._clock_ms = clock_ms
        self._tick_s = tick_s
        self._file = releases.folder / STATE_FILE
        self._imported = False
        # devices' update reports the intake kept, written to the store by the loop
        self._reports: list[tuple[str, Health]] = []
        # a failure was recorded since the pause was last looked at (kept across a store
        # failure): only a new failure pauses, so a rollout the admin resumed past its
        # failures is not paused again by the next device that installs
        self._failed_unchecked = False
        self._wake = asyncio.Event()

    async def current(self) -> Rollout | None:
        """The newest rollout, as the store has it now (any instance may have changed it)."""
        newest = await self._store.rollouts(1)
        return await self._with_devices(newest[0]) if newest else None

    async def history(self) -> list[Rollout]:
        """The rollouts before the current one, newest first."""
        earlier = (await self._store.rollouts(HISTORY_KEPT + 1))[1:]
        return [await self._with_devices(record) for record in earlier]

    async def _with_devices(self, record: RolloutRecord) -> Rollout:
        return Rollout.of(record, await self._store.rollout_devices(record.rollout_id))

    async def import_file(self) -> None:
        """A rollout.json an older gateway kept: into the store once, then renamed, so a
        restart (or another instance sharing the folder) does not import it again."""
        try:
            raw = self._file.read_bytes()
        except FileNotFoundError:
            return
        try:
            old = _State.model_validate_json(raw)
        except ValidationError as exc:
            # written atomically: a damaged disk. No rollout is safer than a wrong one
            log.error("rollout state %s unreadable (%s): not imported", self._file, exc)
            old = _State()
        # oldest first: the newest is the current one
        rollouts = [*reversed(old.history), *([old.current] if old.current else [])]
        ids = {rollout.id for rollout in rollouts}
        stored = await self._store.rollouts(len(ids) + 1)
        if any(record.rollout_id not in ids for record in stored):
            log.warning("%s not imported: the store holds other rollouts already", self._file)
        else:
            # none, or only this file's (an import cut short by a stop): the ones kept
            # already are refused by their id, the rest follow in order
            for rollout in rollouts:
                await self._store.start_rollout(rollout.record(), rollout.device_updates())
            log.warning("%s imported into the store", self._file)
        os.replace(self._file, self._file.with_name(f"{STATE_FILE}.imported"))

    # ---- the admin's actions -------------------------------------------------------------

    async def start(self, version: str, district: str, percent: float) -> Rollout:
        _refuse_if_live(await self.current())
        if self.releases.manifest(version) is None:
            raise RolloutRefused(404, f"no release {version}: `ansimi provision release add` it")
        now = self._clock_ms()
        rollout = Rollout(
            id=f"{version}-{district}-{now}",
            version=version,
            district=district,
            percent=percent,
            started_ms=now,
        )
        rollout.devices = {d: Progress() for d in await self._chosen(rollout)}
        if not rollout.devices:
            raise RolloutRefused(404, f"no device in district {district}")
        if not await self._store.start_rollout(rollout.record(), rollout.device_updates()):
            _refuse_if_live(await self.current())  # another instance's, started meanwhile
            raise RolloutRefused(409, f"rollout {rollout.id} exists already: try again")
        log.warning(
            "rollout %s: %d devices of %s", rollout.id, len(rollout.devices), rollout.district
        )
        self._wake.set()
        return rollout

    async def _chosen(self, rollout: Rollout) -> list[str]:
        devices = await self._store.devices()
        ids = [d.device_id for d in devices if d.district == rollout.district and not d.revoked]
        return chosen(ids, rollout.version, rollout.percent)

    async def resume(self, percent: float | None = None) -> Rollout:
        """Resume a paused rollout; with `percent`, widen it (a done step too: the next one)."""
        rollout = await self._need_current(("running", "paused", "done"))
        if rollout.state == "done" and (percent is None or percent <= rollout.percent):
            raise RolloutRefused(
                400, f"rollout {rollout.id} is done at {rollout.percent:g}%: widen it (--percent)"
            )
        added: list[str] = []
        if percent is not None:
            if percent < rollout.percent:
                raise RolloutRefused(400, f"percent {percent} is below the {rollout.percent} done")
            rollout.percent = percent
            added = [d for d in await self._chosen(rollout) if d not in rollout.devices]
        await self._move(rollout, "running", percent=percent, add_devices=added)
        self._wake.set()
        return await self._with_devices(rollout.record())

    async def abort(self) -> Rollout:
        """Stop offering; devices already updating finish (or roll back) on their own."""
        rollout = await self._need_current(("running", "paused"))
        await self._move(rollout, "aborted")
        return await self._with_devices(rollout.record())

    async def _move(
        self,
        rollout: Rollout,
        to_state: RolloutState,
        *,
        percent: float | None = None,
        add_devices: list[str] | None = None,
    ) -> None:
        """From the state read, or refused: another instance changed it meanwhile."""
        moved = await self._store.move_rollout(
            rollout.id, (rollout.state,), to_state, percent=percent, add_devices=add_devices or ()
        )
        if not moved:
            raise RolloutRefused(409, f"rollout {rollout.id} changed meanwhile: look again")
        rollout.state = to_state
        if to_state == "running":
            rollout.paused_because = None

    async def _need_current(self, states: tuple[str, ...]) -> Rollout:
        rollout = await self.current()
        if rollout is None or rollout.state not in states:
            raise RolloutRefused(404, f"no rollout {' or '.join(states)}")
        return rollout

    # ---- offering, and the devices' reports ----------------------------------------------

    async def tick(self) -> int:
        """Offer the update to the devices due an offer; return how many were offered."""
        newest = await self._store.rollouts(1)
        if not newest or newest[0].state != "running":
            return 0
        rollout = newest[0]
        # claimed in the store first: another instance ticking now offers the others
        due = await self._store.offer_rollout(
            rollout.rollout_id, self._clock_ms(), self._reoffer_ms
        )
        url = f"{self._public_url}/releases/{rollout.version}"
        command = Command(name="update", args={"version": rollout.version, "url": url})
        for device_id in due:
            self._send(device_id, command)
        return len(due)

    def kept(self, items: Iterable[Incoming]) -> None:
        """Intake's kept events: a device's update reports, written by `record_reports`."""
        for item in items:
            if item.type != "health":
                continue
            try:
                health = Health.model_validate_json(item.body_json)
            except ValidationError:
                continue  # intake parsed it already; nothing else to learn here
            if health.event in ("update_installed", "update_failed"):
                self._reports.append((item.device_id, health))
        if self._reports:
            self._wake.set()

    async def record_reports(self) -> None:
        """The reports `kept` heard move their devices in the current rollout."""
        reports, self._reports = self._reports, []
        if not reports:
            return
        try:
            newest = await self._store.rollouts(1)
            if not newest:
                return  # no rollout: nobody's news
            while reports:
                if await self._report(newest[0], *reports[0]) == "failed":
                    self._failed_unchecked = True
                reports.pop(0)
            if self._failed_unchecked:
                await self._pause_if_failing(newest[0])
                self._failed_unchecked = False
        except BaseException:
            self._reports[:0] = reports  # the store failed: tried again at the next round
            raise

    async def _report(
        self, rollout: RolloutRecord, device_id: str, health: Health
    ) -> UpdateOutcome | None:
        """The outcome the report gave its device, None if it changed nothing."""
        version, _, rest = (health.detail or "").partition(" ")
        if version != rollout.version:
            return None
        outcome: UpdateOutcome = "installed"
        if health.event == "update_failed":
            outcome = "not_now" if rest.split(":", 1)[0] in NOT_NOW else "failed"
        reason = rest[:200] if outcome == "failed" else None
        now = self._clock_ms()
        if not await self._store.report_update(rollout.rollout_id, device_id, outcome, reason, now):
            return None  # not its device, or a late offer crossed its installed report
        self._metrics.update_reports.labels(outcome).inc()
        if outcome == "failed":
            log.warning("rollout %s: %s failed: %s", rollout.rollout_id, device_id, reason)
        return outcome

    async def _pause_if_failing(self, rollout: RolloutRecord) -> None:
        devices = await self._store.rollout_devices(rollout.rollout_id)
        failed = sum(d.state == "failed" for d in devices)
        limit = max(1, math.ceil(len(devices) * self._pause_failed_pct / 100))
        if failed < limit:
            return
        because = f"{failed} devices failed (pauses at {limit})"
        # a done rollout too: a device that failed after reporting installed needs a look
        if await self._store.move_rollout(
            rollout.rollout_id, ("running", "done"), "paused", paused_because=because
        ):
            log.error("rollout %s paused: %s", rollout.rollout_id, because)

    async def run(self) -> None:
        while True:
            try:
                if not self._imported:
                    await self.import_file()
                    self._imported = True
                await self.record_reports()
                await self.tick()
            except Exception:
                # a store hiccup must not end the gateway's task group: try at the next tick
                log.exception("rollout: offering failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._tick_s):
                    await self._wake.wait()
            self._wake.clear()

    # ---- HTTP -----------------------------------------------------------------------------

    def routes(self) -> list[ApiRoute]:
        version = [_path_param("version", "a release's version (dotted numbers)")]
        return [
            ApiRoute(
                "GET",
                "/releases/{version}",
                self._download,
                "public",
                _op("a release bundle (devices download it; Range supported)", (200, 404),
                    parameters=version),
            ),
            ApiRoute(
                "POST", "/admin/releases", self._add, "admin",
                _op("add a release bundle (the request body: the bundle file)", (201, 400, 409)),
            ),
            ApiRoute("GET", "/admin/releases", self._list, "admin", _op("releases kept", (200,))),
            ApiRoute(
                "POST", "/admin/rollouts", self._start, "admin",
                _op("start a rollout: {version, district, percent}", (201, 400, 403, 404, 409)),
            ),
            ApiRoute(
                "GET", "/admin/rollouts", self._status, "admin",
                _op("the current rollout, per device, and the earlier ones", (200,)),
            ),
            ApiRoute(
                "POST", "/admin/rollouts/resume", self._resume, "admin",
                _op("resume a paused rollout, or widen it: {percent}", (200, 400, 404)),
            ),
            ApiRoute(
                "POST", "/admin/rollouts/abort", self._abort, "admin",
                _op("stop offering the current rollout", (200, 404)),
            ),
        ]  # fmt: skip

    async def _download(self, request: web.Request) -> web.StreamResponse:
        path = self.releases.path(request.match_info["version"])
        if not path.exists():
            return _error(404, "no such release")
        return web.FileResponse(path)

    async def _add(self, request: web.Request) -> web.Response:
        # streamed to a file: a bundle is megabytes, far over the API's JSON body limit
        upload = self.releases.folder / f".upload.{uuid.uuid4().hex}"
        try:
            size = 0
            with upload.open("wb") as out:
                async for chunk in request.content.iter_chunked(256 * 1024):
                    size += len(chunk)
                    if size > MAX_BUNDLE_BYTES:
                        return self._refused("too_large", f"over {MAX_BUNDLE_BYTES} bytes", 400)
                    out.write(chunk)
            try:
                manifest = await asyncio.to_thread(self.releases.add, upload)
            except ReleaseRefused as exc:
                status = 409 if exc.reason == "not_newer" else 400
                return self._refused(exc.reason, str(exc), status)
        finally:
            upload.unlink(missing_ok=True)
        log.warning("release %s added by %s", manifest.version, request[TOKEN_KEY].name)
        return web.json_response(manifest.model_dump(), status=201)

    def _refused(self, reason: str, message: str, status: int) -> web.Response:
        self._metrics.api_refused.labels(f"release_{reason}").inc()
        log.warning("release refused (%s): %s", reason, message)
        return web.json_response({"error": message, "reason": reason}, status=status)

    async def _list(self, request: web.Request) -> web.Response:
        manifests = await asyncio.to_thread(self.releases.manifests)
        return web.json_response({"releases": [m.model_dump() for m in manifests]})

    async def _start(self, request: web.Request) -> web.Response:
        try:
            asked = _StartRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return _error(400, _first_error(exc))
        token = request[TOKEN_KEY]
        if not token.sees(asked.district):
            return _error(403, f"district {asked.district} is not one of this token's")
        ongoing = await self.current()
        if (
            ongoing is not None
            and ongoing.state in ("running", "paused")
            and not token.sees(ongoing.district)
        ):
            # said without naming it: another district's rollout is not this token's to see
            return _error(409, "a rollout in another district is under way (one at a time)")
        try:
            rollout = await self.start(asked.version, asked.district, asked.percent)
        except RolloutRefused as exc:
            return _error(exc.status, str(exc))
        return web.json_response(rollout.summary(), status=201)

    async def _status(self, request: web.Request) -> web.Response:
        # a token sees the rollouts of its own districts only (their device ids included)
        token = request[TOKEN_KEY]
        current = await self.current()
        history = await self.history()
        return web.json_response(
            {
                "current": (
                    current.model_dump()
                    if current is not None and token.sees(current.district)
                    else None
                ),
                "history": [r.summary() for r in history if token.sees(r.district)],
            }
        )

    async def _not_theirs(self, request: web.Request) -> web.Response | None:
        """A 404 for a token that may not act on the current rollout's district."""
        current = await self.current()
        if current is not None and not request[TOKEN_KEY].sees(current.district):
            return _error(404, "no rollout in this token's districts")
        return None

    async def _resume(self, request: web.Request) -> web.Response:
        if (refused := await self._not_theirs(request)) is not None:
            return refused
        body = await request.read()
        try:
            asked = _ResumeRequest.model_validate_json(body or b"{}")
            rollout = await self.resume(asked.percent)
        except ValidationError as exc:
            return _error(400, _first_error(exc))
        except RolloutRefused as exc:
            return _error(exc.status, str(exc))
        return web.json_response(rollout.summary())

    async def _abort(self, request: web.Request) -> web.Response:
        if (refused := await self._not_theirs(request)) is not None:
            return refused
        try:
            rollout = await self.abort()
        except RolloutRefused as exc:
            return _error(exc.status, str(exc))
        return web.json_response(rollout.summary())


class _StartRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Version
    # a Seoul district code, as a device's (a typo would choose no device)
    district: Annotated[str, AfterValidator(check_district)]
    percent: Annotated[float, Field(gt=0, le=100)]


class _ResumeRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    percent: Annotated[float, Field(gt=0, le=100)] | None = None


def _refuse_if_live(ongoing: Rollout | None) -> None:
    if ongoing is not None and ongoing.state in ("running", "paused"):
        raise RolloutRefused(
            409,
            f"rollout {ongoing.id} of {ongoing.version} to {ongoing.district} is "
            f"{ongoing.state}: resume or abort it first (one rollout at a time)",
        )


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"
