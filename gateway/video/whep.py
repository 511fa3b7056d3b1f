"""WHEP (RFC 9725) for live viewers: POST an SDP offer, get the answer; DELETE to leave.

    POST   /whep/{device_id}              application/sdp offer -> 201, answer, Location
    DELETE /whep/{device_id}/{viewer_id}  -> 200
    POST   /whep/{device_id}/{viewer_id}/talk  {"on", "operator", "reason"} -> 200

Talk-back: a viewer whose offer also sends audio (its microphone) is heard at the door only
while it holds push-to-talk: `on: true` at the press (audited with operator and reason;
it lapses by itself after 30 s), `on: false` at the release.

Every request needs `Authorization: Bearer <token>`. Mounted in the gateway's HTTP API
(`api_routes`), the API's middleware checks it: operator tokens. Stand-alone
(`whep_app`), the `authorize` callable passed in checks it. All ICE candidates are in the answer
(aiortc gathers before answering), so trickle ICE (PATCH) is not offered: 405.
Errors are short plain-text bodies; the detail goes to the gateway's log.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from gateway.api import ApiRoute
from gateway.video.hub import (
    BadOffer,
    DeviceOffline,
    NoSuchViewer,
    TalkbackOff,
    TooManyViewers,
    VideoHub,
)
from protocol.ids import DEVICE_ID_RE

log = logging.getLogger(__name__)

Authorize = Callable[[web.Request], bool]
MAX_OFFER_BYTES = 64 * 1024


def bearer(tokens: Iterable[str]) -> Authorize:
    """An `authorize` that accepts any of `tokens` as `Authorization: Bearer <token>`."""
    accepted = [t.encode() for t in tokens if t]

    def check(request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given or not given.isascii():
            return False  # a non-ASCII byte cannot be any token (and must not be a 500)
        # compare against every token, so timing says nothing about which one nearly matched
        return any([hmac.compare_digest(given.strip().encode(), t) for t in accepted])

    return check


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


class Whep:
    def __init__(self, hub: VideoHub, authorize: Authorize | None = None) -> None:
        self._hub = hub
        self._authorize = authorize

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/whep/{device_id}", self.post),
            web.delete("/whep/{device_id}/{viewer_id}", self.delete),
            web.patch("/whep/{device_id}/{viewer_id}", self.patch),
            web.post("/whep/{device_id}/{viewer_id}/talk", self.talk),
        ]

    def _denied(self, request: web.Request) -> web.Response | None:
        if self._authorize is None or self._authorize(request):
            return None
        return _text(401, "a bearer token is required", **{"WWW-Authenticate": "Bearer"})

    async def post(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        device_id = request.match_info["device_id"]
        if not DEVICE_ID_RE.fullmatch(device_id):
            return _text(404, "no such device")
        if request.content_type != "application/sdp":
            return _text(415, "send the SDP offer as application/sdp")
        if request.content_length is not None and request.content_length > MAX_OFFER_BYTES:
            return _text(413, "offer too large")
        body = await request.content.read(MAX_OFFER_BYTES + 1)
        if len(body) > MAX_OFFER_BYTES:
            return _text(413, "offer too large")
        try:
            offer = body.decode("utf-8")
            viewer = await self._hub.add_viewer(
                device_id,
                offer,
                authorization=request.headers.get("Authorization"),
                # who watches, for the audit of the door's microphone (a desk says)
                operator=request.headers.get("X-Ansimi-Operator", "")[:100],
            )
        except DeviceOffline:
            return _text(404, f"device {device_id} is not streaming; send it video_start")
        except TooManyViewers:
            return _text(503, "too many viewers for this device", **{"Retry-After": "10"})
        except (BadOffer, UnicodeDecodeError) as exc:
            log.info("whep: refused a viewer offer for %s: %s", device_id, exc)
            return _text(400, "malformed SDP offer (it must receive H.264 or VP8 video)")
        location = f"/whep/{device_id}/{viewer.id}"
        return web.Response(
            status=201,
            text=viewer.answer,
            content_type="application/sdp",
            headers={"Location": location},
        )

    async def delete(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if await self._hub.remove_viewer(
            request.match_info["viewer_id"], request.match_info["device_id"]
        ):
            return _text(200, "closed")
        return _text(404, "no such viewer")

    async def talk(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await request.json()
            on = body["on"]
            operator = str(body.get("operator", "")).strip()[:100]
            reason = str(body.get("reason", "")).strip()[:500]
            if not isinstance(on, bool):
                raise TypeError("on is true or false")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _text(400, 'send JSON {"on": true|false, "operator": ..., "reason": ...}')
        if on and (not operator or not reason):
            return _text(400, "talk-back needs an operator and a reason: both are audited")
        try:
            await self._hub.talk(
                request.match_info["device_id"],
                request.match_info["viewer_id"],
                on=on,
                operator=operator,
                reason=reason,
                # on a relay, the holder checks this viewer's own rights
                authorization=request.headers.get("Authorization"),
            )
        except (DeviceOffline, NoSuchViewer):
            return _text(404, "no such viewer of a live stream")
        except TalkbackOff:
            return _text(409, "talk-back is off on this device")
        return _text(200, "talking" if on else "stopped")

    async def patch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return _text(405, "trickle ICE is not supported: all candidates are in the answer")


def whep_app(hub: VideoHub, authorize: Authorize) -> web.Application:
    """A stand-alone app with the WHEP routes (the API mounts `Whep.routes()` instead)."""
    app = web.Application(client_max_size=MAX_OFFER_BYTES)
    app.add_routes(Whep(hub, authorize).routes())
    return app


def _operation(summary: str, responses: dict[int, str], **extra: Any) -> dict[str, Any]:
    return {
        "summary": summary,
        "responses": {str(code): {"description": text} for code, text in responses.items()},
        **extra,
    }


def api_routes(hub: VideoHub) -> list[ApiRoute]:
    """The WHEP routes for `gateway.api.Api.add_routes`: operator tokens, checked by the API."""
    whep = Whep(hub)
    device = {"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}
    viewer = {"name": "viewer_id", "in": "path", "required": True, "schema": {"type": "string"}}
    sdp = {"content": {"application/sdp": {"schema": {"type": "string"}}}}
    denied = {401: "no or unknown token", 403: "token lacks the role"}
    return [
        ApiRoute(
            "POST",
            "/whep/{device_id}",
            whep.post,
            "operator",
            _operation(
                "watch a device's live video (WHEP, RFC 9725): SDP offer in, SDP answer out",
                {
                    201: "the SDP answer; Location names the session for DELETE",
                    400: "malformed SDP offer",
                    **denied,
                    404: "the device is not streaming",
                    413: "offer too large",
                    415: "not application/sdp",
                    503: "too many viewers for this device",
                },
                parameters=[device],
                requestBody={"required": True, **sdp},
            ),
        ),
        ApiRoute(
            "DELETE",
            "/whep/{device_id}/{viewer_id}",
            whep.delete,
            "operator",
            _operation(
                "stop watching",
                {200: "closed", **denied, 404: "no such viewer"},
                parameters=[device, viewer],
            ),
        ),
        ApiRoute(
            "POST",
            "/whep/{device_id}/{viewer_id}/talk",
            whep.talk,
            "operator",
            _operation(
                "push-to-talk: the viewer's microphone to the doorbell's speaker (audited)",
                {
                    200: "talking, or stopped",
                    400: "no operator or reason",
                    **denied,
                    404: "no such viewer",
                    409: "talk-back is off on this device",
                },
                parameters=[device, viewer],
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            ),
        ),
        ApiRoute(
            "PATCH",
            "/whep/{device_id}/{viewer_id}",
            whep.patch,
            "operator",
            _operation(
                "trickle ICE: not supported, all candidates are in the answer",
                {**denied, 405: "not supported"},
                parameters=[device, viewer],
            ),
        ),
    ]
