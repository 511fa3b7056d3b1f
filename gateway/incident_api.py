"""The incident routes of the operator API (docs/incidents.md is the contract).

`GET /incidents?state=&limit=`, `GET /incidents/{id}` (with history and procedure),
`POST /incidents/{id}/acknowledged|dispatched|closed` (closed takes an outcome) and
`POST /incidents/{id}/procedure/{step}`. Scoped like every route: the API's middleware
answers 404 for an incident of a district the token does not serve, and the list holds
only the token's districts. The actor of a move or a tick is the token's name, with the
operator the console signed in (`X-Ansimi-Operator`) after a slash.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, get_args

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from ansimi.httpguard import route_template
from gateway.api import TOKEN_KEY, ApiRoute, _error, _int_query, _op, _path_param
from gateway.downlink import Downlink
from gateway.incidents import (
    INCIDENT_STATES,
    HistoryEntry,
    Incident,
    OperatorStage,
    Outcome,
    ProcedureStep,
    move_incident,
)
from gateway.metrics import Metrics
from gateway.store import OperatorStore
from protocol.clock import wall_ms

log = logging.getLogger(__name__)

OPERATOR_HEADER: Final = "X-Ansimi-Operator"
# an operator's sign-in name as the console sends it: it lands in the audit trail and logs
OPERATOR_RE: Final = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
STATE_FILTERS: Final = ("open", *INCIDENT_STATES)
STAGES: Final[tuple[OperatorStage, ...]] = get_args(OperatorStage)


# a route's work on the incident its path names, by the actor the request names
IncidentAction = Callable[[web.Request, Incident, str], Awaitable[web.Response]]


class CloseRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    outcome: Outcome


class _BadOperator(ValueError):
    pass


def incident_json(incident: Incident, next_escalation_ms: int | None = None) -> dict[str, Any]:
    return {
        "id": incident.incident_id,
        "device_id": incident.device_id,
        "district": incident.district,
        "kind": incident.kind,
        "priority": incident.priority,
        "state": incident.state,
        "opened_ms": incident.opened_ms,
        "updated_ms": incident.updated_ms,
        "first_alert_id": incident.first_alert_id,
        "events": incident.events,
        "offline": incident.offline,
        "escalation_level": incident.escalation_level,
        "escalated_to": list(incident.escalated_to),
        "outcome": incident.outcome,
        "stages": {s: {"at_ms": at, "actor": who} for s, (at, who) in incident.stages.items()},
        "next_escalation_ms": next_escalation_ms,
    }


def _history_json(entry: HistoryEntry) -> dict[str, Any]:
    return {
        "at_ms": entry.at_ms,
        "what": entry.what,
        "actor": entry.actor,
        "event_id": entry.event_id,
        "detail": dict(entry.detail),
    }


class IncidentRoutes:
    def __init__(
        self,
        store: OperatorStore,
        downlink: Downlink,
        metrics: Metrics,
        procedures: Mapping[str, tuple[ProcedureStep, ...]],
        *,
        next_escalation_ms: Callable[[Incident], int | None] = lambda _i: None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._downlink = downlink
        self._metrics = metrics
        self._procedures = procedures
        self._next_escalation_ms = next_escalation_ms
        self._clock_ms = clock_ms or wall_ms

    def routes(self) -> list[ApiRoute]:
        incident_id = _path_param("incident_id", "the incident's id")
        step = _path_param("step", "a step of the incident's procedure")
        json_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
        routes = [
            ApiRoute(
                "GET",
                "/incidents",
                self.listing,
                "operator",
                _op(
                    "incidents of the token's districts, by priority then age",
                    [200, 400, 401, 403],
                    parameters=[
                        {"name": "state", "in": "query", "schema": {"enum": list(STATE_FILTERS)}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                ),
            ),
            ApiRoute(
                "GET",
                "/incidents/{incident_id}",
                self._about_incident(self.one, acting=False),
                "operator",
                _op(
                    "one incident with its history and procedure",
                    [200, 401, 403, 404],
                    parameters=[incident_id],
                ),
            ),
            ApiRoute(
                "POST",
                "/incidents/{incident_id}/procedure/{step}",
                self._about_incident(self.tick),
                "operator",
                _op(
                    "tick a step of the incident's procedure (audited)",
                    [200, 400, 401, 403, 404],
                    parameters=[incident_id, step],
                ),
            ),
        ]
        for stage in STAGES:
            routes.append(
                ApiRoute(
                    "POST",
                    f"/incidents/{{incident_id}}/{stage}",
                    self._about_incident(functools.partial(self.move, stage=stage)),
                    "operator",
                    _op(
                        f"move the incident to {stage} and tell the bell"
                        + (' (body {"outcome": ...})' if stage == "closed" else ""),
                        [200, 400, 401, 403, 404, 409],
                        parameters=[incident_id],
                        **({"requestBody": json_body} if stage == "closed" else {}),
                    ),
                )
            )
        return routes

    def _about_incident(
        self, action: IncidentAction, *, acting: bool = True
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A route's handler: `action` on the incident its path names, by the actor the
        request names (when `acting`). What every incident route refuses is refused here:
        a malformed operator name (400) and an unknown incident (404). The id's grammar
        and the token's districts are the API's scope middleware's."""

        async def handle(request: web.Request) -> web.Response:
            actor = ""
            if acting:
                try:
                    actor = self._actor(request)
                except _BadOperator as exc:
                    return self._refuse(request, "bad_operator", str(exc))
            incident = await self._store.incident(request.match_info["incident_id"])
            if incident is None:
                return _error(404, "no such incident")
            return await action(request, incident, actor)

        return handle

    def _actor(self, request: web.Request) -> str:
        token = request[TOKEN_KEY].name
        operator = request.headers.get(OPERATOR_HEADER)
        if operator is None:
            return token
        if not OPERATOR_RE.fullmatch(operator):
            raise _BadOperator(
                f"{OPERATOR_HEADER} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_', '@' and '-'"
            )
        return f"{token}/{operator}"

    async def listing(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "open")
        if state not in STATE_FILTERS:
            return _error(400, f"state must be one of {', '.join(STATE_FILTERS)}")
        limit = _int_query(request, "limit", 500)
        token = request[TOKEN_KEY]
        districts = None if "*" in token.districts else tuple(token.districts)
        incidents = await self._store.incidents(state, limit, districts)
        return web.json_response(
            {"incidents": [incident_json(i, self._next_escalation_ms(i)) for i in incidents]}
        )

    async def _full(self, incident: Incident) -> dict[str, Any]:
        history = await self._store.incident_history(incident.incident_id)
        ticks = await self._store.incident_ticks(incident.incident_id)
        procedure = [
            {
                "step": s.step,
                "ko": s.ko,
                "en": s.en,
                "done": {"at_ms": ticks[s.step][0], "actor": ticks[s.step][1]}
                if s.step in ticks
                else None,
            }
            for s in self._procedures.get(incident.kind, ())
        ]
        device = await self._store.device(incident.device_id)
        # the bell's state now, for the card (its personal data is GET
        # /devices/{id}/private, audited per view: not here)
        bell = (
            None
            if device is None
            else {
                "kind": device.kind,
                "label": device.label,
                "online": device.online,
                "power": device.power,
                "last_seen_ms": device.last_seen_ms,
                "revoked": device.revoked,
            }
        )
        return {
            **incident_json(incident, self._next_escalation_ms(incident)),
            "device": bell,
            "history": [_history_json(h) for h in history],
            "procedure": procedure,
        }

    async def one(self, request: web.Request, incident: Incident, _actor: str) -> web.Response:
        return web.json_response(await self._full(incident))

    async def move(
        self, request: web.Request, incident: Incident, actor: str, *, stage: OperatorStage
    ) -> web.Response:
        outcome = None
        if stage == "closed":
            try:
                outcome = CloseRequest.model_validate_json(await request.read() or b"{}").outcome
            except ValidationError:
                return self._refuse(
                    request,
                    "bad_outcome",
                    f'closing needs {{"outcome": one of {", ".join(get_args(Outcome))}}}',
                )
        moved = await move_incident(
            self._store, self._downlink, incident, stage, self._clock_ms(), actor, outcome
        )
        if not moved:
            return _error(409, f"the incident is {incident.state} already: stages only go forward")
        current = await self._store.incident(incident.incident_id)
        assert current is not None  # incidents are never deleted
        return web.json_response(incident_json(current, self._next_escalation_ms(current)))

    async def tick(self, request: web.Request, incident: Incident, actor: str) -> web.Response:
        step = request.match_info["step"]
        if step not in {s.step for s in self._procedures.get(incident.kind, ())}:
            return _error(404, f"the procedure for {incident.kind} has no step {step}")
        if await self._store.tick_procedure(incident.incident_id, step, self._clock_ms(), actor):
            # the audit line: who ticked what, when (the log's time), on which bell
            log.info(
                "incident %s (%s): %s ticked %s",
                incident.incident_id,
                incident.device_id,
                actor,
                step,
            )
        current = await self._store.incident(incident.incident_id)
        assert current is not None
        return web.json_response(await self._full(current))

    def _refuse(self, request: web.Request, reason: str, why: str) -> web.Response:
        self._metrics.api_refused.labels(reason).inc()
        log.info("api: refused %s %s: %s", request.method, route_template(request), why)
        return _error(400, why)
