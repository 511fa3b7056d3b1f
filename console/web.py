"""The console's web app: the gateway's webhook, the operators' live page and its API.

    POST /events                       the gateway's webhook (HMAC + device JWS; receiver.py)
    GET  /                             the page (static files, no external assets)
    POST /api/login, /api/logout       sessions (HttpOnly, SameSite=Strict cookie)
    GET  /api/me                       who is signed in, and the session's CSRF token
    GET  /api/incidents                open incidents (one card each) and recent device events
    GET  /api/incidents/{id}           one incident's history and procedure (checklist)
    POST /api/incidents/{id}/{stage}   acknowledged | dispatched | closed ({"outcome"}), via
                                       the gateway's incident routes
    POST /api/incidents/{id}/procedure/{step}   a checklist step ticked, audited
    GET  /api/alerts                   active alerts and recent device events (before incidents)
    GET  /api/stream                   server-sent events: each new event, each stage change,
                                       each incident that changed (`incident`: its card)
    GET  /api/devices/{id}             a device's address, phones, notes, location (personal
                                       data, audited) and its state now
    POST /api/alerts/{id}/{stage}      acknowledged | dispatched | closed, via the gateway
    POST /api/whep/{device}            live video: the SDP offer, proxied to the gateway
    DELETE /api/whep/{device}/{viewer}
    POST /api/whep/{device}/{viewer}/talk  push-to-talk {"on", "reason"}, audited
    GET  /api/alerts/{event}/recordings    an alert's doorbell recordings and timeline
    GET  /api/alerts/{event}/play?index=&reason=  one recording, audited
    GET  /api/audit.csv                the audit log

Every /api route but login needs a session; every POST and DELETE also needs the session's
CSRF token in `X-CSRF-Token`. The gateway's token stays in this process.

Checked once, in the middleware, for every route: each id in the path fits its grammar
(protocol/ids.py), or the request is refused (400) and the attempt audited as what it was.
Every view and action is limited to the operator's districts: lists hold only theirs, and
an id of another district is answered as unknown (404), audited. Sign-in failures slow
down the next attempt of that name from that address (a growing delay, not a lock that a
third party could trigger). Slow clients are closed (ansimi/httpguard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ansimi.httpguard import (
    READ_TIMEOUT_S,
    SlowClientGuard,
    bad_request_id,
    check_app_routes,
    route_template,
)
from console.directory import Directory
from console.gateway_client import OUTCOMES, STAGES, GatewayClient, GatewayError
from console.incidents import Incident, group, merge_gateway, queue_order
from console.operators import Operators, Session, check_hash, valid_name
from console.receiver import ReceivedEvent, Receiver
from protocol.clock import Clock, wall_ms

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "ansimi_session"
CSRF_HEADER = "X-CSRF-Token"
RECENT_MS = 7 * 24 * 3600 * 1000
RECENT_LIMIT = 2000  # events of the last RECENT_MS a page loads, of its operator's districts
SSE_PING_S = 15.0
# How long every district's incidents, grouped once, answer the lookups of one incident by
# id that this console grouped itself (an older gateway's; the gateway's own incidents are
# read one by one) while no event came: a desk of 200 cards asks for 200 details at once,
# and each grouping reads every recent event.
LOOKUP_MAX_AGE_MS = 1_000
# While a page is open, how often the console asks the gateway what its events do not tell
# (a stage set at another desk, a step to another centre, a close elsewhere) and pushes the
# incidents that changed; sooner when an escalation step falls due before it. One call per
# console, not one per page or per event: a desk of 200 cards is not fetched again for each.
GATEWAY_SYNC_S = 2.0
# after a step's due time, the gateway has taken it (it fires at its deadline, within
# milliseconds): the sync asks then
STEP_MARGIN_MS = 100
# at most four syncs a second, however close together the steps of many incidents fall
MIN_SYNC_WAIT_S = 0.25
STAGE_ORDER = ("delivered", "acknowledged", "dispatched", "closed")
# Sign-in failures of one name from one address: the first few are free, then each costs
# a wait that doubles, up to a cap; a success forgets them.
LOGIN_FREE_FAILURES = 5
LOGIN_DELAY_FIRST_MS = 1_000
LOGIN_DELAY_MAX_MS = 5 * 60 * 1000
LOGIN_KEYS_MAX = 10_000  # made-up names and addresses must not grow the table forever
SESSION_KEY: web.RequestKey[Session] = web.RequestKey("session", Session)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:{tiles}; "
    "media-src 'self' blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


def content_policy(tile_url: str) -> str:
    """The page's CSP; the map's tile server, when there is one, is the one other origin
    images may come from ({s}.tiles.example: any of its subdomains)."""
    if not tile_url:
        return CSP.format(tiles="")
    parts = urlsplit(tile_url)
    host = parts.netloc
    if host.startswith("{s}."):
        host = "*." + host.removeprefix("{s}.")
    return CSP.format(tiles=f" {parts.scheme}://{host}")


# Lower is more urgent. A person in danger first, then a ring or press, then the device
# in trouble (tamper, power), then news that needs no action.
_URGENCY = {
    "duress": 0,
    "long_press": 0,
    "press": 1,
    "doorbell_ring": 1,
    "tamper": 2,
    "power_loss": 3,
    "tamper_cleared": 4,
    "power_restored": 4,
    "test": 5,  # a bell proving its path: shown as a test, never an active alert
}
ACTIVE_TRIGGERS = frozenset(t for t, u in _URGENCY.items() if u <= 3)


def urgency(event: ReceivedEvent) -> int:
    if event.type == "alert":
        if event.body.get("urgent"):
            return 0
        return _URGENCY.get(str(event.body.get("trigger", "")), 1)
    if event.type == "status":
        # a device gone quiet, or its SMS backup gone: trouble to look at, not news
        return 3 if event.body.get("state") in ("offline", "secondary_path_down") else 4
    if event.type == "heartbeat":
        return 3 if event.body.get("power") == "battery" else 4
    return 4


def is_active_alert(event: ReceivedEvent) -> bool:
    return event.type == "alert" and str(event.body.get("trigger", "")) in ACTIVE_TRIGGERS


# a frame for the live page, with the district of what it is about (each page shows only
# its operator's); None ends the stream
Frame = tuple[str, str] | None


class Broadcast:
    """Open pages, each with its own bounded queue; a page that cannot keep up is dropped
    (its EventSource reconnects and reloads the list)."""

    def __init__(self, size: int = 1000) -> None:
        self._queues: set[asyncio.Queue[Frame]] = set()
        self._size = size

    def open(self) -> asyncio.Queue[Frame]:
        queue: asyncio.Queue[Frame] = asyncio.Queue(self._size)
        self._queues.add(queue)
        return queue

    def close(self, queue: asyncio.Queue[Frame]) -> None:
        self._queues.discard(queue)

    def __len__(self) -> int:
        return len(self._queues)

    def end_all(self) -> None:
        """Tell every open stream to finish (the console is shutting down)."""
        for queue in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    def publish(self, kind: str, data: dict[str, Any], district: str) -> None:
        frame = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for queue in list(self._queues):
            try:
                queue.put_nowait((district, frame))
            except asyncio.QueueFull:
                self._queues.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)  # tells that page's stream to end


@dataclass
class _Failures:
    count: int = 0
    next_ms: int = 0  # no attempt before this


@dataclass
class _Viewer:
    operator: str
    device_id: str
    location: str  # at the gateway


class ConsoleApp:
    def __init__(
        self,
        receiver: Receiver,
        operators: Operators,
        *,
        directory: Directory | None = None,
        gateway: GatewayClient | None = None,
        secure_cookie: bool = False,
        clock_ms: Clock | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
        tile_url: str = "",
        gateway_sync_s: float | None = GATEWAY_SYNC_S,
    ) -> None:
        """`tile_url`: the map's tile server ({z}/{x}/{y} template); empty: the map shows
        the districts' outlines only (a city runs its own tile server, or has none).
        `gateway_sync_s`: the longest between two syncs with the gateway while a page is
        open (`sync_gateway`); None runs none (a test calls it itself)."""
        self.receiver = receiver
        self.tile_url = tile_url
        self.csp = content_policy(tile_url)
        self.operators = operators
        self.directory = directory if directory is not None else receiver.directory
        self.gateway = gateway
        self.secure_cookie = secure_cookie
        self._clock_ms = clock_ms or wall_ms
        self.broadcast = Broadcast()
        self._viewers: dict[str, _Viewer] = {}
        self._login_failures: dict[tuple[str, str], _Failures] = {}
        self.guard = SlowClientGuard(read_timeout_s)
        # every district's incidents for lookups by id: (version, at_ms, incidents)
        self._lookup: tuple[int, int, list[Incident]] | None = None
        self._lookup_lock = asyncio.Lock()
        self._version = 0  # moves with every event received and every stage set here
        # the gateway's open incidents by id as it last listed them (merged into what is
        # pushed), and as the sync last compared them (what changed since is pushed)
        self._summaries: dict[str, dict[str, Any]] | None = None
        self._synced: dict[str, dict[str, Any]] | None = None
        self._sync_failing = False
        self._sync_s = gateway_sync_s
        self._sync_task: asyncio.Task[None] | None = None
        receiver.listeners.append(self._on_event)

    # ---- the app ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.guard.middleware, self._guard], client_max_size=64 * 1024
        )
        app.add_routes(self.receiver.routes())
        app.add_routes(
            [
                web.get("/", self.index),
                web.get("/fleet", self.fleet_page),
                web.get("/api/fleet", self.fleet),
                web.static("/static", STATIC, append_version=False),
                web.post("/api/login", self.login),
                web.post("/api/logout", self.logout),
                web.get("/api/me", self.me),
                web.get("/api/incidents", self.incidents),
                web.get("/api/incidents/{incident_id}", self.incident),
                web.post("/api/incidents/{incident_id}/procedure/{step}", self.tick),
                web.post("/api/incidents/{incident_id}/{stage}", self.move_incident),
                web.get("/api/alerts", self.alerts),
                web.get("/api/stream", self.stream),
                web.get("/api/devices/{device_id}", self.device),
                web.post("/api/alerts/{event_id}/{stage}", self.move),
                web.post("/api/whep/{device_id}", self.whep_offer),
                web.delete("/api/whep/{device_id}/{viewer_id}", self.whep_delete),
                web.post("/api/whep/{device_id}/{viewer_id}/talk", self.whep_talk),
                web.get("/api/alerts/{event_id}/recordings", self.recordings),
                web.get("/api/alerts/{event_id}/play", self.play_recording),
                web.get("/api/audit.csv", self.audit_csv),
            ]
        )
        app.on_startup.append(self._start_sync)
        app.on_shutdown.append(self._close_streams)
        app.on_cleanup.append(self._stop_sync)
        check_app_routes(app, also=ROUTE_WORDS)  # a route taking an id nobody checks: no start
        return app

    async def _close_streams(self, app: web.Application) -> None:
        self.broadcast.end_all()

    async def _start_sync(self, app: web.Application) -> None:
        if self.gateway is not None and self._sync_s is not None:
            self._sync_task = asyncio.create_task(self._sync_loop(), name="gateway sync")

    async def _stop_sync(self, app: web.Application) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api/") and path != "/api/login":
            session = self.operators.session(request.cookies.get(COOKIE))
            if session is None:
                return web.json_response({"error": "sign in first"}, status=401)
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                given = request.headers.get(CSRF_HEADER, "")
                # ASCII only: a byte outside it arrives as a lone surrogate (no 500 for it)
                if not given.isascii() or not hmac.compare_digest(
                    given.encode(), session.csrf.encode()
                ):
                    return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
            request[SESSION_KEY] = session
        elif path == "/api/login" and not self._same_origin(request):
            return web.json_response({"error": "cross-origin sign-in refused"}, status=403)
        # every route's ids, after the credential check (a stranger learns nothing here)
        problem = bad_request_id(request)
        if problem is not None:
            session = request.get(SESSION_KEY)
            if session is not None:
                # what was attempted, by whom, on which route: the audit tells it as it was
                self.operators.audit(
                    session.operator,
                    "refused_request",
                    route_template(request),
                    method=request.method,
                    path=request.raw_path[:200],
                    why=problem,
                )
            else:
                log.info(
                    "console: refused %s %s: %s", request.method, route_template(request), problem
                )
            return web.json_response({"error": problem}, status=400)
        response = await handler(request)
        if path != "/events":
            response.headers.setdefault("Content-Security-Policy", self.csp)
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
            response.headers.setdefault("X-Frame-Options", "DENY")
            if path.startswith("/api/") or path == "/":
                response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _forget_failures_beyond_bound(self) -> None:
        """Keep the failure table bounded (made-up names and addresses) without forgetting
        the pairs being slowed down: a flood of one-off failures must not free a guesser."""
        if len(self._login_failures) <= LOGIN_KEYS_MAX:
            return
        for key, failures in list(self._login_failures.items()):
            if failures.count < LOGIN_FREE_FAILURES:
                del self._login_failures[key]
        if len(self._login_failures) > LOGIN_KEYS_MAX:
            self._login_failures.clear()  # that many pairs slowed down at once: start over

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser form post from elsewhere (curl, tests)
        return origin in (f"http://{request.host}", f"https://{request.host}")

    # ---- events -----------------------------------------------------------------------

    def _on_event(self, event: ReceivedEvent) -> None:
        self._version += 1
        data = self.event_json(event, [])
        # a gateway that has incidents puts every event of one in it: an event without is
        # a device event for the list, not a change of the desk (an older gateway's
        # events the console groups itself, and the page fetches the list again)
        data["loose"] = not event.incident_id and self._summaries is not None
        self.broadcast.publish("event", data, data["district"])
        if event.incident_id:
            # the card as it is now, pushed: the pages update that one card instead of
            # fetching and grouping the whole desk for each event
            incident = self._incident_now(event.incident_id)
            if incident is not None:
                self._publish_incident(incident)

    def _publish_incident(self, incident: Incident) -> None:
        self.broadcast.publish("incident", incident.json(), incident.district)

    def _incident_now(self, incident_id: str) -> Incident | None:
        """One of the gateway's incidents as the desk shows it: from the events this
        console received of it, the stages set here, and the gateway's last summary."""
        events = self.receiver.events.of_incident(incident_id)
        kinds, districts_of = self._registry_of({e.device_id for e in events})
        found, _ = group(events, kinds, self.operators.stages([incident_id]), districts_of)
        incident = next((i for i in found if i.id == incident_id), None)
        summary = (self._summaries or {}).get(incident_id)
        if incident is not None and summary is not None:
            merge_gateway(incident, summary)
        return incident

    def _registry_of(self, device_ids: set[str]) -> tuple[dict[str, str], dict[str, str]]:
        """The kinds and districts of these devices, as the directory has them."""
        kinds: dict[str, str] = {}
        districts_of: dict[str, str] = {}
        for device_id in device_ids:
            info = self.directory.get(device_id) if self.directory is not None else None
            if info is not None:
                kinds[device_id], districts_of[device_id] = info.kind, info.district
        return kinds, districts_of

    async def _sync_loop(self) -> None:
        assert self._sync_s is not None
        while True:
            wait_s = self._sync_s
            if len(self.broadcast):  # nobody watching: nothing to push
                try:
                    wait_s = min(wait_s, await self.sync_gateway())
                except Exception:
                    log.exception("console: a sync with the gateway failed; trying again")
            await asyncio.sleep(wait_s)

    async def sync_gateway(self) -> float:
        """Ask the gateway for its open incidents and push each one that changed since the
        last sync (one that left the list was closed elsewhere); how long until the next."""
        assert self.gateway is not None
        try:
            summaries = await self.gateway.incidents()
        except GatewayError as exc:
            if not self._sync_failing:  # once per outage, not every GATEWAY_SYNC_S
                log.warning("console: the gateway's incidents are unavailable: %s", exc)
            self._sync_failing = True
            return GATEWAY_SYNC_S
        self._sync_failing = False
        if summaries is None:
            return GATEWAY_SYNC_S  # a gateway older than incidents: the events tell all
        now = self._clock_ms()
        # compared with the last sync's, or with what the pages loaded before the first;
        # with neither, every one is pushed: the cards pushed so far lacked the gateway's
        # part (its opening time, stages), and the queue's order rests on it
        previous = self._synced if self._synced is not None else self._summaries
        by_id, listed_all = self._keep_summaries(summaries)
        self._synced = self._summaries
        changed = [i for i, s in by_id.items() if previous is None or previous.get(i) != s]
        gone = [] if previous is None or not listed_all else [i for i in previous if i not in by_id]
        for incident_id in changed + gone:
            incident = self._incident_now(incident_id)
            if incident is None:
                continue  # none of its events reached this console (yet)
            if incident_id in gone:
                incident.move("closed", now, "gateway")
            self._version += 1
            self._publish_incident(incident)
        # a step falls due sooner than the next sync: ask right after it
        due = (s.get("next_escalation_ms") for s in summaries if s.get("state") == "new")
        coming = [d for d in due if type(d) is int and d > now]
        if not coming:
            return GATEWAY_SYNC_S
        until_s = (min(coming) + STEP_MARGIN_MS - now) / 1000
        return min(GATEWAY_SYNC_S, max(MIN_SYNC_WAIT_S, until_s))

    def _keep_summaries(
        self, summaries: list[dict[str, Any]]
    ) -> tuple[dict[str, dict[str, Any]], bool]:
        """The gateway's open incidents by id, kept to merge into the cards; and whether
        that was all of them. One left out of a list cut at its limit (the least urgent)
        is not closed: it keeps its last summary until a whole list tells."""
        assert self.gateway is not None
        by_id = {str(s.get("id")): s for s in summaries}
        listed_all = self.gateway.listed_all(summaries)
        self._summaries = by_id if listed_all else {**(self._summaries or {}), **by_id}
        return by_id, listed_all

    def district_of(self, device_id: str, event: ReceivedEvent | None = None) -> str:
        """The district of a device (as its event was forwarded, else the registry's);
        "" when unknown, which only an all-districts operator sees."""
        if event is not None and event.district:
            return event.district
        info = self.directory.get(device_id) if self.directory is not None else None
        return info.district if info is not None else ""

    def _outside_districts(self, session: Session, action: str, target: str, district: str) -> bool:
        """True, audited, when the operator does not serve `district`. Callers then answer
        exactly as for an id that does not exist, so the two cannot be told apart."""
        if session.sees(district):
            return False
        why = "another district" if district else "unknown device"
        self.operators.audit(session.operator, action, target, ok=False, why=why, district=district)
        return True

    def event_json(self, event: ReceivedEvent, stages: list[dict[str, Any]]) -> dict[str, Any]:
        info = self.directory.get(event.device_id) if self.directory is not None else None
        stage = "delivered"
        for mark in stages:
            if STAGE_ORDER.index(mark["stage"]) > STAGE_ORDER.index(stage):
                stage = mark["stage"]
        return {
            "event_id": event.event_id,
            "device_id": event.device_id,
            "type": event.type,
            "body": event.body,
            "district": event.district or (info.district if info else ""),
            "kind": info.kind if info else "",
            "label": info.label if info else "",
            "ts_ms": event.ts_ms,
            "received_ms": event.received_ms,
            "urgency": urgency(event),
            "active": is_active_alert(event),
            "stage": stage,
            "stages": stages,
            "incident_id": event.incident_id,
        }

    # ---- pages and sessions -----------------------------------------------------------

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def fleet_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "fleet.html")

    async def fleet(self, request: web.Request) -> web.Response:
        """The fleet view (the gateway's `GET /fleet`), within the operator's districts."""
        if self.gateway is None:
            return web.json_response({"error": "no gateway configured"}, status=404)
        try:
            devices = await self.gateway.fleet()
        except GatewayError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        session = request[SESSION_KEY]
        seen = [d for d in devices if session.sees(str(d.get("district", "")))]
        return web.json_response({"devices": seen})

    async def login(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            name = str(data["name"]).strip()
            password = str(data["password"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send JSON {name, password}"}, status=400)
        if not valid_name(name):
            # no operator has it; it goes nowhere (SQL, the audit) as it is, and costs a
            # wrong password's time like any unknown name
            name = "(not a valid name)"
        # keyed on the name AND the address: failures from elsewhere never slow the
        # operator down at their own desk
        key = (name, request.remote or "")
        now = self._clock_ms()
        self._forget_failures_beyond_bound()
        failures = self._login_failures.setdefault(key, _Failures())
        if now < failures.next_ms:
            wait_s = -(-(failures.next_ms - now) // 1000)
            self.operators.audit(
                name[:64], "login_refused", "console", why="too soon", wait_s=wait_s
            )
            return web.json_response(
                {"error": f"too many failed sign-ins from here; try again in {wait_s} s"},
                status=429,
                headers={"Retry-After": str(wait_s)},
            )
        # counted as a failure before the check: the check is awaited, and guesses sent
        # all at once must not all pass the delay above before the first failure counts
        failures.count += 1
        failures.next_ms = now + login_delay_ms(failures.count)
        # scrypt takes tens of milliseconds: off the event loop, which carries the alerts
        loop = asyncio.get_running_loop()
        stored = self.operators.password_hash(name)
        ok = await loop.run_in_executor(None, check_hash, password, stored)
        if not ok:
            self.operators.audit(name[:64], "login_failed", "console")
            return web.json_response({"error": "wrong name or password"}, status=401)
        self._login_failures.pop(key, None)
        token, session = self.operators.open_session(name)
        self.operators.audit(name, "login", "console")
        response = web.json_response({"name": session.operator, "csrf": session.csrf})
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=self.secure_cookie,
            path="/",
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        token = request.cookies.get(COOKIE, "")
        self.operators.close_session(token)
        self.operators.audit(request[SESSION_KEY].operator, "logout", "console")
        response = web.json_response({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def me(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        return web.json_response(
            {
                "name": session.operator,
                "csrf": session.csrf,
                "video": self.gateway is not None,
                # None: no gateway configured, only the HMAC is checked
                "registry": None
                if self.directory is None
                else {"devices": len(self.directory), "synced": self.directory.synced_ok},
                # deliveries this console refused: the gateway keeps retrying them, but
                # until the cause is fixed (a key, a secret) operators do not see them
                "refused": self.receiver.refused,
                "tile_url": self.tile_url,
            }
        )

    # ---- alerts -----------------------------------------------------------------------

    async def alerts(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        since = self._clock_ms() - RECENT_MS
        districts = None if session.sees_all else session.districts
        recent = [
            e
            for e in self.receiver.events.recent(since, RECENT_LIMIT, districts)
            if session.sees(self.district_of(e.device_id, e))
        ]
        stages = self.operators.stages([e.event_id for e in recent])
        events = [self.event_json(e, stages.get(e.event_id, [])) for e in recent]
        # an alert id names the cancelling device's own alert: another device's cancel
        # under the same id (arrived before the alert, so not refused) cancels nothing
        cancelled = {
            (e["device_id"], str(e["body"].get("alert_id")))
            for e in events
            if e["type"] == "cancel"
        }
        for e in events:
            e["cancelled"] = (e["device_id"], e["event_id"]) in cancelled
        active = [e for e in events if e["active"] and e["stage"] != "closed"]
        active.sort(key=lambda e: (e["urgency"], e["stage"] != "delivered", e["received_ms"]))
        others = [e for e in events if not e["active"]][:200]
        return web.json_response({"alerts": active, "events": others})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        session = request[SESSION_KEY]
        token = request.cookies.get(COOKIE)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # a proxy in front must not hold events back
            }
        )
        await response.prepare(request)
        queue = self.broadcast.open()
        try:
            await response.write(b"retry: 2000\nevent: hello\ndata: {}\n\n")
            while True:
                try:
                    async with asyncio.timeout(SSE_PING_S):
                        frame = await queue.get()
                except TimeoutError:
                    # a comment keeps proxies from closing an idle stream, and a signed-out
                    # or expired session stops receiving
                    if self.operators.session(token) is None:
                        break
                    await response.write(b": ping\n\n")
                    continue
                if frame is None:
                    break
                district, text = frame
                if session.sees(district):
                    await response.write(text.encode())
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self.broadcast.close(queue)
        log.debug("console: stream of %s ended", session.operator)
        return response

    async def device(self, request: web.Request) -> web.Response:
        """A device's address and floor, read from the gateway for this view only (the
        console keeps no personal data); None where the gateway has none."""
        device_id = request.match_info["device_id"]
        info = self.directory.get(device_id) if self.directory is not None else None
        if info is None:
            return web.json_response({"error": NO_DEVICE}, status=404)
        session = request[SESSION_KEY]
        operator = session.operator
        if self._outside_districts(session, "view_personal_data", device_id, info.district):
            return web.json_response({"error": NO_DEVICE}, status=404)
        private: dict[str, Any] | None = None
        if self.gateway is not None:
            try:
                private = await self.gateway.private(device_id)
            except GatewayError as exc:
                self.operators.audit(
                    operator, "view_personal_data_failed", device_id, error=str(exc)
                )
                return web.json_response({"error": str(exc)}, status=exc.status)
        # personal data: who looked, and when, is kept (never the data itself)
        self.operators.audit(
            operator,
            "view_personal_data",
            device_id,
            fields=["address", "floor", "phones", "notes", "location"],
            present=private is not None,
        )
        return web.json_response(
            {
                "device_id": info.device_id,
                "label": info.label,
                "kind": info.kind,
                "district": info.district,
                **(private or {"address": None, "floor": None, "phones": [], "notes": ""}),
                "now": self.device_now(device_id),
            }
        )

    def device_now(self, device_id: str) -> dict[str, Any]:
        """The bell's state as this console last heard it: online or offline (the
        gateway's status), mains or battery (its heartbeats and power alerts), when."""
        online: bool | None = None
        power: str | None = None
        last_heard_ms: int | None = None
        for event in self.receiver.events.of_device(device_id):  # newest first
            body = event.body
            if event.signer == device_id or event.type != "status":
                last_heard_ms = last_heard_ms or event.received_ms
            if (
                online is None
                and event.type == "status"
                and body.get("state")
                in (
                    "online",
                    "offline",
                )
            ):
                online = body.get("state") == "online"
            if power is None:
                if event.type == "heartbeat" and body.get("power") in ("mains", "battery"):
                    power = str(body["power"])
                elif event.type == "alert" and body.get("trigger") == "power_loss":
                    power = "battery"
                elif event.type == "alert" and body.get("trigger") == "power_restored":
                    power = "mains"
        if online is None and last_heard_ms is not None:
            online = True  # heard from, and no offline since
        return {"online": online, "power": power, "last_heard_ms": last_heard_ms}

    # ---- incidents --------------------------------------------------------------------

    async def _incidents(self, session: Session) -> tuple[list[Incident], list[ReceivedEvent]]:
        """The operator's incidents, from the events this console received, with what the
        gateway knows beyond them (stages from other desks, escalation); and the events
        that belong to no incident."""
        since = self._clock_ms() - RECENT_MS
        districts = None if session.sees_all else session.districts
        recent = [
            e
            for e in self.receiver.events.recent(since, RECENT_LIMIT, districts)
            if session.sees(self.district_of(e.device_id, e))
        ]
        kinds, districts_of = self._registry_of({e.device_id for e in recent})
        ids = {e.incident_id or e.event_id for e in recent}
        found, loose = group(recent, kinds, self.operators.stages(sorted(ids)), districts_of)
        # asked even with no card of the gateway's yet: what it answers is kept, and the
        # cards pushed from then on carry its part (opening time, stages) from the start
        if self.gateway is not None:
            try:
                summaries = await self.gateway.incidents()
            except GatewayError as exc:
                log.warning("console: the gateway's incidents are unavailable: %s", exc)
                summaries = None
            if summaries is not None:
                by_id, listed_all = self._keep_summaries(summaries)
                for incident in found:
                    if incident.id in by_id:
                        merge_gateway(incident, by_id[incident.id])
                    elif listed_all and not incident.grouped_by_console:
                        # the gateway owns it and has it open no more: closed at another
                        # desk, or by the gateway itself
                        incident.move("closed", incident.opened_ms, "gateway")
        return [i for i in found if session.sees(i.district)], loose

    async def _everyone(self, session: Session) -> list[Incident]:
        """Every district's incidents, grouped once for a burst of lookups (one at a time:
        the others wait and take its result), again after an event or a stage set here, or
        LOOKUP_MAX_AGE_MS later."""
        async with self._lookup_lock:
            cached, now = self._lookup, self._clock_ms()
            fresh = cached is not None and 0 <= now - cached[1] < LOOKUP_MAX_AGE_MS
            if cached is not None and fresh and cached[0] == self._version:
                return cached[2]
            version = self._version
            everyone, _ = await self._incidents(Session(session.operator, session.csrf))
            self._lookup = (version, now, everyone)
            return everyone

    async def _incident_of(self, request: web.Request, action: str) -> Incident | None:
        """The incident named in the path, if the operator serves its district (audited
        when not, and answered as unknown)."""
        session = request[SESSION_KEY]
        incident_id = request.match_info["incident_id"]
        # the gateway's incident from its own events (an indexed read); else one this
        # console grouped (an older gateway), found among every district's. The
        # operator's districts are checked next, audited.
        found = self._incident_now(incident_id)
        if found is None:
            everyone = await self._everyone(session)
            found = next((i for i in everyone if i.id == incident_id), None)
        if found is None:
            return None
        if self._outside_districts(session, action, incident_id, found.district):
            return None
        return found

    async def incidents(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        found, loose = await self._incidents(session)
        open_ = sorted((i for i in found if i.state != "closed"), key=queue_order)
        events = sorted(loose, key=lambda e: e.received_ms, reverse=True)[:200]
        stages = self.operators.stages([e.event_id for e in events])
        return web.json_response(
            {
                "incidents": [i.json() for i in open_],
                "events": [self.event_json(e, stages.get(e.event_id, [])) for e in events],
            }
        )

    async def incident(self, request: web.Request) -> web.Response:
        """One incident: its summary, its history and its procedure (the gateway's; from
        this console's own records for a gateway without incidents)."""
        found = await self._incident_of(request, "view_incident")
        if found is None:
            return web.json_response({"error": NO_INCIDENT}, status=404)
        detail: dict[str, Any] = {"history": _history(found), "procedure": []}
        if self.gateway is not None and not found.grouped_by_console:
            try:
                from_gateway = await self.gateway.incident(found.id)
            except GatewayError as exc:
                log.warning("console: incident %s from the gateway: %s", found.id, exc)
            else:
                merge_gateway(found, from_gateway)
                for key in ("history", "procedure"):
                    if isinstance(from_gateway.get(key), list):
                        detail[key] = from_gateway[key]
                if isinstance(from_gateway.get("device"), dict):
                    detail["device"] = from_gateway["device"]  # the bell's state now
        return web.json_response({**found.json(), **detail})

    async def move_incident(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        operator = session.operator
        stage = request.match_info["stage"]
        if stage not in STAGES:
            return web.json_response({"error": NO_INCIDENT}, status=404)
        outcome: str | None = None
        if stage == "closed":
            try:
                outcome = (await request.json())["outcome"]
            except (ValueError, KeyError, TypeError):
                outcome = None
            if outcome not in OUTCOMES:
                return web.json_response(
                    {"error": f"closing needs an outcome, one of {', '.join(OUTCOMES)}"},
                    status=400,
                )
        found = await self._incident_of(request, stage)
        if found is None:
            return web.json_response({"error": NO_INCIDENT}, status=404)
        if self.gateway is None:
            return web.json_response({"error": "no gateway API configured (--gateway)"}, status=503)
        try:
            if found.grouped_by_console:
                # a gateway without incidents: its alert route moves the bell's alert
                result = await self.gateway.move(found.first_alert_id, stage)
            else:
                result = await self.gateway.move_incident(found.id, stage, operator, outcome)
        except GatewayError as exc:
            self.operators.audit(
                operator, stage, found.id, device=found.device_id, ok=False, error=str(exc)
            )
            return web.json_response({"error": str(exc)}, status=exc.status)
        at = self.operators.set_stage(found.id, stage, operator)
        self._version += 1
        self.operators.audit(
            operator, stage, found.id, device=found.device_id, ok=True, outcome=outcome
        )
        log.info(
            "console: %s moved incident %s (%s) to %s", operator, found.id, found.device_id, stage
        )
        self.broadcast.publish(
            "incident_stage",
            {"id": found.id, "stage": stage, "operator": operator, "at_ms": at},
            found.district,
        )
        return web.json_response({"id": found.id, "stage": stage, "gateway": result})

    async def tick(self, request: web.Request) -> web.Response:
        """A procedure step done: ticked at the gateway, and in this console's audit with
        the operator and the time (the audit's own)."""
        session = request[SESSION_KEY]
        operator = session.operator
        step = request.match_info["step"]  # its grammar checked with every path id
        found = await self._incident_of(request, "procedure_step")
        if found is None:
            return web.json_response({"error": NO_INCIDENT}, status=404)
        if self.gateway is None or found.grouped_by_console:
            return web.json_response(
                {"error": "procedures need a gateway with incidents"}, status=503
            )
        try:
            result = await self.gateway.tick(found.id, step, operator)
        except GatewayError as exc:
            self.operators.audit(
                operator, "procedure_step", found.id, step=step, ok=False, error=str(exc)
            )
            return web.json_response({"error": str(exc)}, status=exc.status)
        self.operators.audit(
            operator, "procedure_step", found.id, step=step, device=found.device_id, ok=True
        )
        self.broadcast.publish(
            "incident_tick", {"id": found.id, "step": step, "operator": operator}, found.district
        )
        return web.json_response(result)

    async def move(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        operator = session.operator
        event_id = request.match_info["event_id"]
        stage = request.match_info["stage"]
        event = self.receiver.events.get(event_id)
        if stage not in STAGES or event is None or event.type != "alert":
            return web.json_response({"error": NO_ALERT}, status=404)
        district = self.district_of(event.device_id, event)
        if self._outside_districts(session, stage, event_id, district):
            return web.json_response({"error": NO_ALERT}, status=404)
        if self.gateway is None:
            return web.json_response({"error": "no gateway API configured (--gateway)"}, status=503)
        try:
            result = await self.gateway.move(event_id, stage)
        except GatewayError as exc:
            self.operators.audit(
                operator, stage, event_id, device=event.device_id, ok=False, error=str(exc)
            )
            return web.json_response({"error": str(exc)}, status=exc.status)
        at = self.operators.set_stage(event_id, stage, operator)
        self.operators.audit(operator, stage, event_id, device=event.device_id, ok=True)
        log.info("console: %s moved %s (%s) to %s", operator, event_id, event.device_id, stage)
        self.broadcast.publish(
            "stage",
            {"event_id": event_id, "stage": stage, "operator": operator, "at_ms": at},
            district,
        )
        return web.json_response({"event_id": event_id, "stage": stage, "gateway": result})

    # ---- video ------------------------------------------------------------------------

    async def whep_offer(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        operator = session.operator
        device_id = request.match_info["device_id"]
        if self._outside_districts(session, "view_video", device_id, self.district_of(device_id)):
            return web.Response(status=404, text=NO_VIDEO)
        if self.gateway is None:
            return web.Response(status=503, text="no gateway API configured\n")
        if request.content_type != "application/sdp":
            return web.Response(status=415, text="send the SDP offer as application/sdp\n")
        offer = (await request.read()).decode("utf-8", errors="replace")
        try:
            answer = await self.gateway.whep_offer(device_id, offer, operator)
        except GatewayError as exc:
            # 404 is "not streaming yet": the page asks again in a moment, nothing was seen
            if exc.status == 404:
                return web.Response(status=404, text=NO_VIDEO)
            self.operators.audit(operator, "view_video_failed", device_id, error=str(exc))
            return web.Response(status=exc.status, text=f"{exc}\n")
        # the stream is about to reach this operator's screen: that is the view to record
        self.operators.audit(operator, "view_video", device_id)
        viewer_id = secrets.token_urlsafe(12)
        self._viewers[viewer_id] = _Viewer(operator, device_id, answer.location)
        return web.Response(
            status=201,
            text=answer.sdp,
            content_type="application/sdp",
            headers={"Location": f"/api/whep/{device_id}/{viewer_id}"},
        )

    async def whep_delete(self, request: web.Request) -> web.Response:
        operator = request[SESSION_KEY].operator
        viewer = self._viewers.get(request.match_info["viewer_id"])
        if viewer is None or viewer.operator != operator:
            return web.Response(status=404, text="no such viewer\n")
        del self._viewers[request.match_info["viewer_id"]]
        if self.gateway is not None and viewer.location:
            await self.gateway.whep_delete(viewer.location)
        self.operators.audit(operator, "stop_video", viewer.device_id)
        return web.Response(status=200, text="closed\n")

    async def whep_talk(self, request: web.Request) -> web.Response:
        """Push-to-talk to the door: each press audited here and at the gateway."""
        operator = request[SESSION_KEY].operator
        viewer = self._viewers.get(request.match_info["viewer_id"])
        if viewer is None or viewer.operator != operator or self.gateway is None:
            return web.Response(status=404, text="no such viewer\n")
        try:
            body = await request.json()
            on = body["on"]
            reason = str(body.get("reason", "")).strip()[:500]
            if not isinstance(on, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return web.Response(status=400, text='send {"on": true|false, "reason": ...}\n')
        if on and not reason:
            return web.Response(status=400, text="say why you speak to the door\n")
        try:
            await self.gateway.whep_talk(viewer.location, on=on, operator=operator, reason=reason)
        except GatewayError as exc:
            if on:
                self.operators.audit(operator, "talkback_failed", viewer.device_id, error=str(exc))
            return web.Response(status=exc.status, text=f"{exc}\n")
        if on:
            self.operators.audit(operator, "talkback", viewer.device_id, reason=reason)
        return web.Response(status=200, text="talking\n" if on else "stopped\n")

    # ---- recordings -------------------------------------------------------------------

    def _alert_in_scope(self, request: web.Request, action: str) -> ReceivedEvent | None:
        session = request[SESSION_KEY]
        event_id = request.match_info["event_id"]
        event = self.receiver.events.get(event_id)
        if event is None or event.type != "alert":
            return None
        district = self.district_of(event.device_id, event)
        if self._outside_districts(session, action, event_id, district):
            return None
        return event

    async def recordings(self, request: web.Request) -> web.Response:
        event = self._alert_in_scope(request, "list_recordings")
        if event is None:
            return web.json_response({"error": NO_ALERT}, status=404)
        if self.gateway is None:
            return web.json_response({"error": "no gateway API configured"}, status=503)
        try:
            return web.json_response(await self.gateway.recordings(event.event_id))
        except GatewayError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)

    async def play_recording(self, request: web.Request) -> web.StreamResponse:
        operator = request[SESSION_KEY].operator
        event = self._alert_in_scope(request, "play_recording")
        if event is None:
            return web.json_response({"error": NO_ALERT}, status=404)
        if self.gateway is None:
            return web.json_response({"error": "no gateway API configured"}, status=503)
        reason = request.query.get("reason", "").strip()[:500]
        try:
            index = int(request.query.get("index", "0"))
        except ValueError:
            return web.json_response({"error": "index is a whole number"}, status=400)
        if not reason:
            return web.json_response({"error": "say why you play the recording"}, status=400)
        try:
            async with self.gateway.play(event.event_id, index, operator, reason) as upstream:
                if upstream.status != 200:
                    return web.json_response(
                        {"error": f"the gateway answered {upstream.status}"},
                        status=upstream.status if upstream.status in (400, 404, 409) else 502,
                    )
                # the gateway has audited it too; here, who at this desk
                self.operators.audit(
                    operator,
                    "play_recording",
                    event.event_id,
                    device=event.device_id,
                    reason=reason,
                    index=index,
                )
                response = web.StreamResponse(
                    headers={"Content-Type": upstream.headers.get("Content-Type", "video/mp4")}
                )
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_chunked(64 * 1024):
                        await response.write(chunk)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # started already: the page sees a cut recording; the reason goes here
                    log.warning("console: a recording of %s broke off: %s", event.event_id, exc)
                    return response
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("console: playing a recording of %s failed: %s", event.event_id, exc)
            return web.json_response({"error": "the gateway is unreachable"}, status=502)

    # ---- audit ------------------------------------------------------------------------

    async def audit_csv(self, request: web.Request) -> web.Response:
        session = request[SESSION_KEY]
        operator = session.operator
        if not session.sees_all:
            # the log names devices and alerts of every district: a supervisor's view
            self.operators.audit(operator, "export_audit", "console", ok=False, why="districts")
            return web.json_response(
                {"error": "the audit log is for operators of all districts"}, status=403
            )
        self.operators.audit(operator, "export_audit", "console")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return web.Response(
            text=self.operators.audit_csv(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="audit-{stamp}.csv"'},
        )


# path parameters that are the console's own words, checked by their handlers, not ids
ROUTE_WORDS = ("stage",)
# one answer each for "no such" and "not in your districts"
NO_ALERT = "no such alert or stage"
NO_DEVICE = "no such device"
NO_INCIDENT = "no such incident"
NO_VIDEO = "no live video for this device (yet)\n"


def _history(incident: Incident) -> list[dict[str, Any]]:
    """An incident's history from this console's own records: its events and stages."""
    entries: list[dict[str, Any]] = [
        {
            "at_ms": e.received_ms,
            "what": "event",
            "actor": "gateway" if e.signer and e.signer != e.device_id else "device",
            "event_id": e.event_id,
            "detail": {"type": e.type, "body": e.body},  # as the gateway's history has it
        }
        for e in incident.events
    ]
    entries += [
        {"at_ms": m["at_ms"], "what": "stage", "actor": m["actor"], "detail": {"stage": s}}
        for s, m in incident.stages.items()
    ]
    return sorted(entries, key=lambda h: int(h["at_ms"]))


def login_delay_ms(failures: int) -> int:
    """The wait after `failures` failed sign-ins in a row of one name from one address."""
    extra = failures - LOGIN_FREE_FAILURES
    if extra < 0:
        return 0
    return min(LOGIN_DELAY_FIRST_MS << min(extra, 30), LOGIN_DELAY_MAX_MS)
