"""The operator HTTP API: alert stages, devices, alerts, metrics, and admin routes.

Control centres move an alert forward (`acknowledged`, `dispatched`, `closed`); each
step is kept with who did it and sent to the bell as a signed ack. Reads: `/devices`,
`/alerts?state=`, `/metrics` (Prometheus text). Admin routes register and revoke devices
(revocation is in effect for the device's very next message).

Authentication: `Authorization: Bearer <token>`, tokens from the config, each with a
name (recorded as the actor of a stage) and a role: `operator` tokens reach the operator
routes, `admin` tokens the admin routes, and neither reaches the other's. Every token is
compared in constant time, all of them every time. `/healthz` and `/openapi.json` are
public: they reveal nothing about devices or alerts.

Scope, checked in one place (the middleware) for every route: each id in a path must fit
its grammar (protocol/ids.py; 400 otherwise), and a device or event id of a district the
token does not serve is answered 404, as if it did not exist, whatever the route. Lists
(`/devices`, `/alerts`) hold only the token's districts. Slow clients are closed
(ansimi/httpguard.py).

Other parts add routes with `add_routes()` (provisioning's enrolment endpoint, say) before
the gateway starts; each route brings its OpenAPI operation, so the description served at
`/openapi.json` always lists every route (a test holds it to that).
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError

from ansimi.districts import check_district
from ansimi.httpguard import (
    READ_TIMEOUT_S,
    SlowClientGuard,
    bad_request_id,
    check_app_routes,
    route_template,
)
from ansimi.listen import start_site
from gateway.config import ApiToken
from gateway.downlink import Downlink
from gateway.errors import GatewayError
from gateway.incidents import OperatorStage, is_test_press, move_incident
from gateway.intake import Registry
from gateway.metrics import Metrics
from gateway.store import Device, DeviceKind, DuplicateDevice, Event, EventState, OperatorStore
from protocol.clock import wall_ms
from protocol.errors import Malformed
from protocol.ids import DeviceId
from protocol.keys import public_key_from_b64
from protocol.numbers import parse_whole

log = logging.getLogger(__name__)

Role = Literal["public", "operator", "admin"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")

# the stages an operator may move an alert to; `received`/`delivered` are the gateway's
OPERATOR_STAGES: tuple[OperatorStage, ...] = ("acknowledged", "dispatched", "closed")
MAX_BODY_BYTES = 64 * 1024
MAX_LIMIT = 100_000  # the most rows a ?limit= may ask for
TOKEN_KEY: web.RequestKey[ApiToken] = web.RequestKey("token", ApiToken)


@dataclass(frozen=True, slots=True)
class ApiRoute:
    """One route, who may call it, and its OpenAPI operation object."""

    method: str
    path: str
    handler: Handler
    role: Role
    operation: dict[str, Any] = field(default_factory=dict)


class ApiTlsError(GatewayError, ValueError):
    """The API's certificate or key cannot be used."""


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The server side of HTTPS for the API; raises ApiTlsError naming the file and the fix."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise ApiTlsError(
            f"api.cert_file {cert_file} / api.key_file {key_file}: cannot load them "
            f"({reason}). Fix: point both at a readable PEM certificate chain and its key"
        ) from None
    return context


class NewDevice(BaseModel):
    """POST /admin/devices: what provisioning registers."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: DeviceId
    public_key: Annotated[str, StringConstraints(min_length=43, max_length=43)]
    kind: DeviceKind
    # a Seoul district code: a typo would route the bell's alerts to the central centre only
    district: Annotated[str, AfterValidator(check_district)]
    label: Annotated[str, StringConstraints(max_length=200)] = ""


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _op(summary: str, responses: Iterable[int], **extra: Any) -> dict[str, Any]:
    described = {
        200: "OK",
        201: "created",
        400: "bad request",
        401: "no or unknown token",
        403: "token lacks the role",
        404: "not found",
        409: "conflict",
        500: "internal error (details in the gateway's log)",
        503: "not connected to the broker",
    }
    return {
        "summary": summary,
        "responses": {str(code): {"description": described[code]} for code in responses},
        **extra,
    }


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


class Api:
    def __init__(
        self,
        store: OperatorStore,
        registry: Registry,
        downlink: Downlink,
        metrics: Metrics,
        tokens: Sequence[ApiToken],
        *,
        connected: Callable[[], bool] = lambda: True,
        health: Callable[[bool], tuple[int, dict[str, Any]]] | None = None,
        clock_ms: Callable[[], int] | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self._store = store
        self._registry = registry
        self._downlink = downlink
        self._metrics = metrics
        self._tokens = [(t, t.secret.encode()) for t in tokens]
        self._connected = connected
        # (HTTP status, body) of every path's health (gateway/health.py), with the details
        # or not; without it, the broker connection alone
        self._health = health
        self._clock_ms = clock_ms or wall_ms
        self._routes: list[ApiRoute] = []
        self._roles: dict[tuple[str, str], Role] = {}
        self.port: int | None = None  # the bound port, once serving
        self.guard = SlowClientGuard(
            read_timeout_s, on_close=lambda why: metrics.api_refused.labels(f"slow_{why}").inc()
        )
        self.add_routes(self._own_routes())

    # ---- extension ----------------------------------------------------------------------

    def add_routes(self, routes: Iterable[ApiRoute]) -> None:
        """Add routes (before `app()`); each must bring a summary and its responses."""
        for route in routes:
            key = (route.method.upper(), route.path)
            if key in self._roles:
                raise ValueError(f"{key[0]} {key[1]} is already a route of the API")
            if "summary" not in route.operation or "responses" not in route.operation:
                raise ValueError(
                    f"{key[0]} {key[1]}: its OpenAPI operation needs a summary and responses"
                )
            self._routes.append(route)
            self._roles[key] = route.role

    @property
    def routes(self) -> list[ApiRoute]:
        return list(self._routes)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.guard.middleware, self._authenticate, self._scope],
            client_max_size=MAX_BODY_BYTES,
        )
        for route in self._routes:
            app.router.add_route(route.method.upper(), route.path, route.handler)
        check_app_routes(app)  # a route taking an id nobody checks does not start
        return app

    def openapi(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        for route in self._routes:
            operation = dict(route.operation)
            if route.role != "public":
                operation["security"] = [{route.role: []}]
            paths.setdefault(route.path, {})[route.method.lower()] = operation
        bearer = {"type": "http", "scheme": "bearer"}
        return {
            "openapi": "3.1.0",
            "info": {"title": "Ansimi Edge gateway API", "version": "1"},
            "paths": paths,
            "components": {
                "securitySchemes": {
                    "operator": {**bearer, "description": "an operator or centre token"},
                    "admin": {**bearer, "description": "an admin (provisioning) token"},
                }
            },
        }

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Serve until cancelled (a task in the gateway's TaskGroup); HTTPS with `tls`."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            self.port = await start_site(  # the real port when `port` is 0
                runner,
                host,
                port,
                ssl_context=tls,
                what="the gateway's API",
                fix="set another in [api] port (and give installers and consoles the new URL)",
            )
            log.info("api: listening on %s:%s", host, self.port)
            await self.guard.watch(runner)
        finally:
            await runner.cleanup()

    # ---- authentication -----------------------------------------------------------------

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)  # aiohttp's own 404/405: nothing to protect
        route = request.match_info.route
        resource = route.resource
        path = resource.canonical if resource is not None else ""
        # fail closed: a route that did not come through add_routes() has no role and
        # is treated as an admin route
        role = self._roles.get((route.method, path), "admin")
        if role == "public":
            return await handler(request)
        token = self._token_of(request)
        if token is None:
            return web.json_response(
                {"error": "send Authorization: Bearer <token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="ansimi"'},
            )
        if token.role != role:
            return _error(403, f"this route needs an {role} token")
        request[TOKEN_KEY] = token
        return await handler(request)

    @web.middleware
    async def _scope(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Ids in the path fit their grammar, and belong to the token's districts."""
        if request.match_info.http_exception is not None:
            return await handler(request)
        problem = bad_request_id(request)
        if problem is not None:
            self._metrics.api_refused.labels("bad_id").inc()
            log.info("api: refused %s %s: %s", request.method, route_template(request), problem)
            return _error(400, problem)
        token = request.get(TOKEN_KEY)
        names_a_device = {"device_id", "event_id", "incident_id"} & request.match_info.keys()
        if token is not None and "*" not in token.districts and names_a_device:
            district = await self._district_of(request.match_info)
            if district is None or not token.sees(district):
                if district is not None:
                    self._metrics.api_refused.labels("district").inc()
                    log.warning(
                        "api: %s refused %s %s (another district)",
                        token.name,
                        request.method,
                        route_template(request),
                    )
                # one answer for "no such" and "not yours", whatever the route: a desk
                # cannot probe which ids exist in other districts
                return _error(404, "not found in your districts")
        try:
            return await handler(request)
        except _BadNumber as exc:
            self._metrics.api_refused.labels("bad_number").inc()
            log.info("api: refused %s %s: %s", request.method, route_template(request), exc)
            return _error(400, str(exc))

    async def _district_of(self, params: Any) -> str | None:
        """The district of the device a path names (by device, event or incident id); None if
        unknown."""
        device_id = params.get("device_id")
        event_id = params.get("event_id")
        incident_id = params.get("incident_id")
        if device_id is None and incident_id is not None:
            incident = await self._store.incident(incident_id)
            device_id = incident.device_id if incident is not None else None
        if device_id is None and event_id is not None:
            event = await self._store.event(event_id)
            device_id = event.device_id if event is not None else None
        if device_id is None:
            return None
        device = await self._store.device(device_id)
        return device.district if device is not None else None

    def _token_of(self, request: web.Request) -> ApiToken | None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        # tokens are ASCII; a header byte outside it (aiohttp hands it over as a lone
        # surrogate, which cannot be encoded) is simply no token, not a 500
        if scheme.lower() != "bearer" or not presented or not presented.isascii():
            return None
        offered = presented.strip().encode()
        found = None
        # every token compared every time, in constant time: no timing says which is close
        for token, secret in self._tokens:
            if hmac.compare_digest(offered, secret):
                found = token
        return found

    # ---- handlers -----------------------------------------------------------------------

    def _own_routes(self) -> list[ApiRoute]:
        event_id = _path_param("event_id", "the alert's id (the device's message id)")
        device_id = _path_param("device_id", "the device's id")
        json_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
        routes = [
            ApiRoute(
                "GET",
                "/healthz",
                self.healthz,
                "public",
                _op(
                    "health of each path: 503 when the intake is deaf (names the path); 200"
                    " with status degraded when a centre is down or the disk low; which"
                    " centre, since when, and the disk's figures only with a token",
                    [200, 503],
                ),
            ),
            ApiRoute(
                "GET", "/openapi.json", self.openapi_json, "public", _op("this description", [200])
            ),
            ApiRoute(
                "GET",
                "/metrics",
                self.metrics,
                "operator",
                _op("Prometheus metrics", [200, 401, 403]),
            ),
            ApiRoute(
                "GET",
                "/devices",
                self.devices,
                "operator",
                _op(
                    "devices and their state",
                    [200, 401, 403],
                    parameters=[
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                        {"name": "keys", "in": "query", "schema": {"enum": ["0", "1"]}},
                    ],
                ),
            ),
            ApiRoute(
                "GET",
                "/alerts",
                self.alerts,
                "operator",
                _op(
                    "alerts, newest first",
                    [200, 400, 401, 403],
                    parameters=[
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"enum": list(get_args(EventState))},
                        },
                        {
                            "name": "type",
                            "in": "query",
                            "schema": {"type": "string", "default": "alert"},
                        },
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                ),
            ),
            ApiRoute(
                "GET",
                "/alerts/{event_id}",
                self.alert,
                "operator",
                _op("one alert with its stages", [200, 401, 403, 404], parameters=[event_id]),
            ),
        ]
        for stage in OPERATOR_STAGES:
            routes.append(
                ApiRoute(
                    "POST",
                    f"/alerts/{{event_id}}/{stage}",
                    self._stage_handler(stage),
                    "operator",
                    _op(
                        f"move the alert to {stage} and tell the bell"
                        + (" (never a test press: 409)" if stage == "dispatched" else ""),
                        [200, 401, 403, 404, *([409] if stage == "dispatched" else [])],
                        parameters=[event_id],
                    ),
                )
            )
        routes += [
            ApiRoute(
                "POST",
                "/admin/devices",
                self.register,
                "admin",
                _op("register a device", [201, 400, 401, 403, 409], requestBody=json_body),
            ),
            ApiRoute(
                "GET",
                "/admin/devices/{device_id}",
                self.admin_device,
                "admin",
                _op(
                    "one device, with its public key", [200, 401, 403, 404], parameters=[device_id]
                ),
            ),
            ApiRoute(
                "POST",
                "/admin/devices/{device_id}/revoke",
                self.revoke,
                "admin",
                _op(
                    "revoke a device: its next message is refused",
                    [200, 401, 403, 404],
                    parameters=[device_id],
                ),
            ),
        ]
        return routes

    async def healthz(self, request: web.Request) -> web.Response:
        if self._health is not None:
            # a public route: the details only for a caller with a token (any role)
            status, body = self._health(self._token_of(request) is not None)
            return web.json_response(body, status=status)
        connected = self._connected()
        return web.json_response(
            {"ok": connected, "mqtt": "connected" if connected else "disconnected"},
            status=200 if connected else 503,
        )

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    async def metrics(self, request: web.Request) -> web.Response:
        waiting = await self._store.waiting_count()
        self._metrics.waiting.set(waiting)
        body = await self._metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def devices(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", 10_000)
        token = request[TOKEN_KEY]
        devices = [d for d in await self._store.devices() if token.sees(d.district)]
        # keys=1: the public keys too (not secret), so a control centre can check each
        # device's own signature on what it is forwarded (console/directory.py)
        with_key = request.query.get("keys") == "1"
        return web.json_response(
            {"devices": [_device_json(d, with_key=with_key) for d in devices[:limit]]}
        )

    async def alerts(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in get_args(EventState):
            return _error(400, f"state must be one of {', '.join(get_args(EventState))}")
        kind = request.query.get("type", "alert") or None
        limit = _int_query(request, "limit", 500)
        token = request[TOKEN_KEY]
        if "*" in token.districts:
            events = await self._store.events(state, limit, type=kind)  # type: ignore[arg-type]
        else:
            events = await self._district_events(token, state, kind, limit)  # type: ignore[arg-type]
        return web.json_response({"alerts": [_event_json(e) for e in events]})

    async def _district_events(
        self, token: ApiToken, state: EventState | None, kind: str | None, limit: int
    ) -> list[Event]:
        """The newest `limit` events of the token's districts: pages of all events, filtered
        (the store has no district column on events), growing until enough or none left."""
        districts = {d.device_id: d.district for d in await self._store.devices()}
        page = limit
        while True:
            events = await self._store.events(state, page, type=kind)
            mine = [e for e in events if token.sees(districts.get(e.device_id, ""))]
            if len(mine) >= limit or len(events) < page or page >= MAX_LIMIT * 8:
                return mine[:limit]
            page *= 4

    async def alert(self, request: web.Request) -> web.Response:
        event_id = request.match_info["event_id"]
        event = await self._store.event(event_id)
        if event is None:
            return _error(404, f"no alert {event_id}")
        stages = await self._store.stages(event_id)
        return web.json_response(
            {
                **_event_json(event),
                "stages": [{"stage": s, "at_ms": at, "actor": who} for s, at, who in stages],
            }
        )

    def _stage_handler(self, stage: OperatorStage) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            return await self.move(request, stage)

        return handle

    async def move(self, request: web.Request, stage: OperatorStage) -> web.Response:
        event_id = request.match_info["event_id"]
        actor = request[TOKEN_KEY].name
        event = await self._store.event(event_id)
        if event is None:
            return _error(404, f"no alert {event_id}")
        if stage == "dispatched" and is_test_press(event.type, event.body_json):
            self._metrics.api_refused.labels("test_dispatch").inc()
            log.warning("api: %s refused dispatching test press %s", actor, event_id)
            return _error(409, "a test press is never dispatched: acknowledge or close it")
        incident_id = await self._store.incident_of(event_id)
        incident = await self._store.incident(incident_id) if incident_id is not None else None
        if incident is not None:
            # the alert's incident moves, and all its events and the bell's ack with it
            # (docs/incidents.md); closed here, with no outcome asked, counts as real
            outcome = "real" if stage == "closed" else None
            moved = await move_incident(
                self._store, self._downlink, incident, stage, self._clock_ms(), actor, outcome
            )
        else:
            moved = await self._store.set_stage(event_id, stage, self._clock_ms(), actor)
        if incident is None and moved:
            log.info("api: %s moved %s (%s) to %s", actor, event_id, event.device_id, stage)
            if event.type == "alert":
                # fire and forget: paho queues it while the broker is away, and the
                # stage is kept either way; the bell shows the furthest stage it sees
                self._downlink.ack(event.device_id, event_id, stage)
        current = await self._store.event(event_id)
        return web.json_response(
            {"event_id": event_id, "moved": moved, "state": current.state if current else stage}
        )

    async def register(self, request: web.Request) -> web.Response:
        try:
            new = NewDevice.model_validate_json(await request.read())
            public_key_from_b64(new.public_key)
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(400, f"{where}: {first['msg']}")
        except Malformed as exc:
            return _error(400, str(exc))
        token = request[TOKEN_KEY]
        if not token.sees(new.district):
            # the path-id scope in `_scope` cannot see a district named in a body
            self._metrics.api_refused.labels("district").inc()
            log.warning("api: %s refused registering a device in %s", token.name, new.district)
            return _error(
                403,
                f"district {new.district} is not one of this token's: {', '.join(token.districts)}",
            )
        device = Device(new.id, new.public_key, new.kind, new.district, new.label)
        try:
            await self._store.add_device(device, self._clock_ms())
        except DuplicateDevice as exc:
            return _error(409, str(exc))
        await self._registry.refresh(new.id)
        log.info("api: %s registered %s", request[TOKEN_KEY].name, new.id)
        registered = await self._store.device(new.id)
        assert registered is not None
        return web.json_response(_device_json(registered, with_key=True), status=201)

    async def admin_device(self, request: web.Request) -> web.Response:
        device = await self._store.device(request.match_info["device_id"])
        if device is None:
            return _error(404, "no such device")
        return web.json_response(_device_json(device, with_key=True))

    async def revoke(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        if not await self._store.revoke(device_id, self._clock_ms()):
            return _error(404, "no such device")
        # in effect for the device's very next message, on this instance at once
        await self._registry.refresh(device_id)
        log.warning("api: %s revoked %s", request[TOKEN_KEY].name, device_id)
        return web.json_response({"device_id": device_id, "revoked": True})


def _int_query(request: web.Request, name: str, default: int) -> int:
    """A whole-number query parameter, clamped to [1, MAX_LIMIT]; 400 if not ASCII digits
    (`?limit=²` passes `str.isdigit()` and then breaks `int()`)."""
    text = request.query.get(name)
    if text is None:
        return default
    try:
        return max(1, min(parse_whole(text, name), MAX_LIMIT))
    except Malformed as exc:
        raise _BadNumber(str(exc)) from None


class _BadNumber(ValueError):
    """A query parameter that is not a whole number; the scope middleware answers 400."""


def _device_json(device: Device, *, with_key: bool = False) -> dict[str, Any]:
    data = asdict(device)
    data["id"] = data.pop("device_id")
    data.pop("high_water")
    if not with_key:
        data.pop("public_key")
    return data


def _event_json(event: Event) -> dict[str, Any]:
    data = asdict(event)
    data["body"] = json.loads(data.pop("body_json"))
    return data
