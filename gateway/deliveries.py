"""Deliveries a centre has not accepted yet, for people: why, and a way to try again.

`GET /deliveries` (operator) lists them, oldest retry first, with the centre's last answer:
`?state=waiting` those still retried (a centre down), `?state=refused` those a centre
refused outright and that are parked until someone fixes the cause (gateway/forward.py).
`POST /admin/deliveries/retry` (admin) makes parked ones due again: all, or one centre's
(`{"centre": ...}`), or one event's (`{"event_id": ...}`). Both are scoped to the token's
districts: a desk sees and retries only its own districts' deliveries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.api import TOKEN_KEY, ApiRoute, _error, _int_query, _op
from gateway.config import ApiToken
from gateway.store import OperatorStore
from protocol.clock import wall_ms
from protocol.ids import DEVICE_ID_RE, DeviceId, MessageId

log = logging.getLogger(__name__)

T = TypeVar("T")
STATES = ("waiting", "refused")


class RetryRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # a centre's name (its [[centres]] name); unset: every centre
    centre: DeviceId | None = None
    event_id: MessageId | None = None


def _districts(token: ApiToken) -> Sequence[str] | None:
    """None for a token that sees every district, else its districts."""
    return None if "*" in token.districts else tuple(token.districts)


class DeliveryRoutes:
    def __init__(
        self,
        store: OperatorStore,
        wake: Callable[[], None],
        *,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._wake = wake  # the forwarder: look at the outbox now
        self._clock_ms = clock_ms or wall_ms

    def routes(self) -> list[ApiRoute]:
        json_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
        return [
            ApiRoute(
                "GET",
                "/deliveries",
                self.listing,
                "operator",
                _op(
                    "deliveries no centre has accepted yet, with the last answer (own districts)",
                    [200, 400, 401, 403],
                    parameters=[
                        {"name": "state", "in": "query", "schema": {"enum": list(STATES)}},
                        {"name": "centre", "in": "query", "schema": {"type": "string"}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    ],
                ),
            ),
            ApiRoute(
                "POST",
                "/admin/deliveries/retry",
                self.retry,
                "admin",
                _op(
                    "send refused deliveries again, once the cause is fixed (own districts)",
                    [200, 400, 401, 403],
                    requestBody=json_body,
                ),
            ),
        ]

    async def listing(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        if state is not None and state not in STATES:
            return _error(400, f"state must be one of {', '.join(STATES)}")
        limit = _int_query(request, "limit", 500)
        centre = request.query.get("centre")
        if centre is not None and not DEVICE_ID_RE.fullmatch(centre):
            return _error(400, "centre must be a centre's name (a-z, 0-9, '-')")
        waiting = await self._store.waiting(
            limit,
            centre=centre,
            refused=None if state is None else state == "refused",
            districts=_districts(request[TOKEN_KEY]),
        )
        rows = [
            {**asdict(w), "state": "waiting" if w.refused_ms is None else "refused"}
            for w in waiting
        ]
        return web.json_response({"deliveries": rows})

    async def retry(self, request: web.Request) -> web.Response:
        token = request[TOKEN_KEY]
        try:
            wanted = RetryRequest.model_validate_json(await request.read() or b"{}")
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(400, f"{where}: {first['msg']}")
        retried = await self._store.retry_refused(
            self._clock_ms(),
            centre=wanted.centre,
            event_id=wanted.event_id,
            districts=_districts(token),
        )
        log.warning(
            "api: %s sent %d refused deliveries again (centre %s, event %s)",
            token.name,
            retried,
            wanted.centre or "any",
            wanted.event_id or "any",
        )
        if retried:
            self._wake()
        return web.json_response({"retried": retried})
