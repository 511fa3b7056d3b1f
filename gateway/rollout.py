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
by itself once failures reach `pause_failed_pct` of its devices. State is one JSON file
beside the bundles, written atomically: one gateway instance runs rollouts (see
docs/fleet.md for a cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ansimi.bundle import MAX_BUNDLE_BYTES, read_bundle, sha256_file
from ansimi.districts import check_district
from ansimi.files import write_atomic
from gateway.api import TOKEN_KEY, ApiRoute, _error, _op, _path_param
from gateway.errors import GatewayError
from gateway.incidents import Incident
from gateway.metrics import Metrics
from gateway.store import Device, Incoming
from protocol.messages import Command, Health
from protocol.release import Manifest, ReleaseRefused, Version

log = logging.getLogger(__name__)

STATE_FILE: Final = "rollout.json"
HISTORY_KEPT: Final = 20
# reasons a device gives that say "not now", not "broken": it is offered again later
NOT_NOW: Final = ("incident_open", "busy")

DeviceState = Literal["pending", "offered", "installed", "failed"]
RolloutState = Literal["running", "paused", "aborted", "done"]


class RolloutStore(Protocol):
    async def devices(self) -> list[Device]: ...
    async def incidents(
        self, state: str | None, limit: int, districts: Sequence[str] | None = None
    ) -> list[Incident]: ...


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


class _State(BaseModel):
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
        self._path = releases.folder / STATE_FILE
        self._state = self._load()
        self._wake = asyncio.Event()

    def _load(self) -> _State:
        try:
            return _State.model_validate_json(self._path.read_bytes())
        except FileNotFoundError:
            return _State()
        except (OSError, ValidationError) as exc:
            # written atomically: a damaged disk. No rollout is safer than a wrong one
            log.error("rollout state %s unreadable (%s): no rollout running", self._path, exc)
            return _State()

    def _save(self) -> None:
        write_atomic(self._path, self._state.model_dump_json().encode(), mode=0o600)

    @property
    def current(self) -> Rollout | None:
        return self._state.current

    # ---- the admin's actions -------------------------------------------------------------

    async def start(self, version: str, district: str, percent: float) -> Rollout:
        ongoing = self.current
        if ongoing is not None and ongoing.state in ("running", "paused"):
            raise RolloutRefused(
                409,
                f"rollout {ongoing.id} of {ongoing.version} to {ongoing.district} is "
                f"{ongoing.state}: resume or abort it first (one rollout at a time)",
            )
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
        await self._choose(rollout)
        if not rollout.devices:
            raise RolloutRefused(404, f"no device in district {district}")
        if ongoing is not None:
            self._state.history = [ongoing, *self._state.history][:HISTORY_KEPT]
        self._state.current = rollout
        self._save()
        log.warning(
            "rollout %s: %d devices of %s", rollout.id, len(rollout.devices), rollout.district
        )
        self._wake.set()
        return rollout

    async def _choose(self, rollout: Rollout) -> None:
        devices = await self._store.devices()
        ids = [d.device_id for d in devices if d.district == rollout.district and not d.revoked]
        for device_id in chosen(ids, rollout.version, rollout.percent):
            rollout.devices.setdefault(device_id, Progress())

    async def resume(self, percent: float | None = None) -> Rollout:
        """Resume a paused rollout; with `percent`, widen it (a done step too: the next one)."""
        rollout = self._need_current(("running", "paused", "done"))
        if rollout.state == "done" and (percent is None or percent <= rollout.percent):
            raise RolloutRefused(
                400, f"rollout {rollout.id} is done at {rollout.percent:g}%: widen it (--percent)"
            )
        if percent is not None:
            if percent < rollout.percent:
                raise RolloutRefused(400, f"percent {percent} is below the {rollout.percent} done")
            rollout.percent = percent
            await self._choose(rollout)
        rollout.state = "running"
        rollout.paused_because = None
        self._save()
        self._wake.set()
        return rollout

    def abort(self) -> Rollout:
        """Stop offering; devices already updating finish (or roll back) on their own."""
        rollout = self._need_current(("running", "paused"))
        rollout.state = "aborted"
        self._save()
        return rollout

    def _need_current(self, states: tuple[str, ...]) -> Rollout:
        rollout = self.current
        if rollout is None or rollout.state not in states:
            raise RolloutRefused(404, f"no rollout {' or '.join(states)}")
        return rollout

    # ---- offering, and the devices' reports ----------------------------------------------

    async def tick(self) -> int:
        """Offer the update to the devices due an offer; return how many were offered."""
        rollout = self.current
        if rollout is None or rollout.state != "running":
            return 0
        now = self._clock_ms()
        due = [
            device_id
            for device_id, p in rollout.devices.items()
            if p.state == "pending" or (p.state == "offered" and now - p.at_ms >= self._reoffer_ms)
        ]
        if not due:
            self._finish_if_done(rollout)
            return 0
        incidents = await self._store.incidents("open", 100_000, [rollout.district])
        busy = {incident.device_id for incident in incidents}
        url = f"{self._public_url}/releases/{rollout.version}"
        command = Command(name="update", args={"version": rollout.version, "url": url})
        offered = 0
        for device_id in due:
            if device_id in busy:
                continue  # never during an open incident: offered at a later tick
            self._send(device_id, command)
            progress = rollout.devices[device_id]
            progress.state, progress.at_ms, progress.offers = "offered", now, progress.offers + 1
            offered += 1
        if offered:
            self._save()
        return offered

    def kept(self, items: Iterable[Incoming]) -> None:
        """Intake's kept events: a device's update reports move its progress."""
        rollout = self.current
        if rollout is None:
            return
        changed = False
        for item in items:
            progress = rollout.devices.get(item.device_id)
            if item.type != "health" or progress is None:
                continue
            try:
                health = Health.model_validate_json(item.body_json)
            except ValidationError:
                continue  # intake parsed it already; nothing else to learn here
            changed |= self._report(rollout, item.device_id, progress, health)
        if changed:
            self._pause_if_failing(rollout)
            self._finish_if_done(rollout)
            self._save()

    def _report(self, rollout: Rollout, device_id: str, progress: Progress, health: Health) -> bool:
        version, _, rest = (health.detail or "").partition(" ")
        if version != rollout.version:
            return False
        now = self._clock_ms()
        if health.event == "update_installed":
            progress.state, progress.at_ms, progress.reason = "installed", now, None
            self._metrics.update_reports.labels("installed").inc()
            return True
        if health.event != "update_failed":
            return False
        reason = rest.split(":", 1)[0]
        if reason in NOT_NOW and progress.state == "installed":
            return False  # a late offer crossed the device's report: it is updated
        if reason in NOT_NOW:
            progress.state, progress.at_ms = "pending", now  # again at a later tick
            self._metrics.update_reports.labels("not_now").inc()
        else:
            progress.state, progress.at_ms, progress.reason = "failed", now, rest[:200]
            self._metrics.update_reports.labels("failed").inc()
            log.warning("rollout %s: %s failed: %s", rollout.id, device_id, rest[:200])
        return True

    def _pause_if_failing(self, rollout: Rollout) -> None:
        failed = rollout.counts()["failed"]
        limit = max(1, math.ceil(len(rollout.devices) * self._pause_failed_pct / 100))
        # a done rollout too: a device that failed after reporting installed needs a look
        if rollout.state in ("running", "done") and failed >= limit:
            rollout.state = "paused"
            rollout.paused_because = f"{failed} devices failed (pauses at {limit})"
            log.error("rollout %s paused: %s", rollout.id, rollout.paused_because)

    def _finish_if_done(self, rollout: Rollout) -> None:
        counts = rollout.counts()
        if rollout.state == "running" and counts["pending"] == counts["offered"] == 0:
            rollout.state = "done"
            self._save()

    async def run(self) -> None:
        while True:
            try:
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
        ongoing = self.current
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
        current = self.current
        return web.json_response(
            {
                "current": (
                    current.model_dump()
                    if current is not None and token.sees(current.district)
                    else None
                ),
                "history": [r.summary() for r in self._state.history if token.sees(r.district)],
            }
        )

    def _not_theirs(self, request: web.Request) -> web.Response | None:
        """A 404 for a token that may not act on the current rollout's district."""
        current = self.current
        if current is not None and not request[TOKEN_KEY].sees(current.district):
            return _error(404, "no rollout in this token's districts")
        return None

    async def _resume(self, request: web.Request) -> web.Response:
        if (refused := self._not_theirs(request)) is not None:
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
        if (refused := self._not_theirs(request)) is not None:
            return refused
        try:
            rollout = self.abort()
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


def _first_error(exc: ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"
