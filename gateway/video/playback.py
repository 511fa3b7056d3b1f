"""Playback on the desk: an alert's recordings and timeline, for its districts' operators.

    GET /video/events/{event_id}/recordings                   -> JSON: recordings + timeline
    GET /video/events/{event_id}/play?index=&operator=&reason=  -> the video (MP4/WebM)

Incidents are keyed on the alert's id (the incident's first alert) until incidents exist.
The API's scope middleware answers an alert of another district 404 (gateway/api.py). The
list verifies each recording's seal; the video is decrypted on the fly, chunk by chunk,
and only after the playback is audited (audit.py) with the token, the operator and the
reason: no reason, no video.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any

from aiohttp import web

from ansimi.privacy import Keyring
from gateway.api import TOKEN_KEY, ApiRoute
from gateway.store import Event
from gateway.video import audit
from gateway.video.encrypted import RecordingBroken, open_chunks
from gateway.video.export import ExportError, Found, recordings_for
from protocol.jws import KeyResolver

log = logging.getLogger(__name__)

MEDIA_TYPE = {"H264": "video/mp4", "VP8": "video/webm"}
MAX_REASON = 500


class Playback:
    def __init__(
        self,
        root: Path,
        keyring: Keyring | None,
        resolve: KeyResolver,
        event_of: Callable[[str], Awaitable[Event | None]],
        stages_of: Callable[[str], Awaitable[list[tuple[str, int, str]]]],
    ) -> None:
        self._root = root
        self._keyring = keyring
        self._resolve = resolve
        self._event_of = event_of
        self._stages_of = stages_of

    async def _found(self, event_id: str) -> tuple[Event, list[Found]] | web.Response:
        if self._keyring is None:
            return web.json_response({"error": "no data key: nothing is recorded"}, status=503)
        event = await self._event_of(event_id)
        if event is None:
            return web.json_response({"error": "not found in your districts"}, status=404)
        keyring = self._keyring
        try:
            found = await asyncio.to_thread(
                recordings_for,
                self._root,
                event.device_id,
                event.ts_ms / 1000,
                keyring,
                self._resolve,
            )
        except ExportError as exc:
            log.error("video: a recording of event %s fails its seal: %s", event_id, exc)
            return web.json_response({"error": "a recording fails its seal"}, status=409)
        return event, found

    async def list(self, request: web.Request) -> web.Response:
        event_id = request.match_info["event_id"]
        result = await self._found(event_id)
        if isinstance(result, web.Response):
            return result
        event, found = result
        stages = await self._stages_of(event_id)
        recordings = [
            {
                "index": i,
                "codec": f.facts.get("codec"),
                "started": f.facts.get("started"),
                "ended": f.facts.get("ended"),
                "complete": f.facts.get("complete"),
                "size": f.facts.get("plaintext_size"),
            }
            for i, f in enumerate(found)
        ]
        timeline: list[dict[str, Any]] = [
            {"at": event.ts_ms / 1000, "what": event.type, "by": event.device_id},
            *({"at": at / 1000, "what": stage, "by": actor} for stage, at, actor in stages),
        ]
        return web.json_response(
            {
                "event": event_id,
                "device": event.device_id,
                "recordings": recordings,
                "timeline": timeline,
            }
        )

    async def play(self, request: web.Request) -> web.StreamResponse:
        event_id = request.match_info["event_id"]
        operator = request.query.get("operator", "").strip()[:100]
        reason = request.query.get("reason", "").strip()[:MAX_REASON]
        if not operator or not reason:
            return web.json_response(
                {"error": "playback needs ?operator= and ?reason=: both are audited"}, status=400
            )
        try:
            index = int(request.query.get("index", "0"))
        except ValueError:
            return web.json_response({"error": "index is a whole number"}, status=400)
        result = await self._found(event_id)
        if isinstance(result, web.Response):
            return result
        event, found = result
        if not 0 <= index < len(found):
            return web.json_response({"error": "no such recording of this event"}, status=404)
        item = found[index]
        await asyncio.to_thread(
            audit.append,
            self._root,
            "playback",
            operator=operator,
            reason=reason,
            token=request[TOKEN_KEY].name,
            event=event_id,
            device=event.device_id,
            recordings=[item.path.name],
        )
        assert self._keyring is not None
        chunks: Generator[bytes, None, None] = open_chunks(item.path, self._keyring)
        response = web.StreamResponse(
            headers={"Content-Type": MEDIA_TYPE.get(str(item.facts.get("codec")), "video/mp4")}
        )
        await response.prepare(request)
        try:
            while (data := await asyncio.to_thread(next, chunks, None)) is not None:
                await response.write(data)
        except RecordingBroken as exc:
            # verified a moment ago; changed since: stop, the desk sees a cut stream
            log.error("video: playback of event %s stopped: %s", event_id, exc)
        finally:
            chunks.close()
        await response.write_eof()
        return response


def api_routes(playback: Playback) -> list[ApiRoute]:
    event = {"name": "event_id", "in": "path", "required": True, "schema": {"type": "string"}}
    index = {"name": "index", "in": "query", "required": False, "schema": {"type": "integer"}}
    query = [
        {"name": name, "in": "query", "required": True, "schema": {"type": "string"}}
        for name in ("operator", "reason")
    ]

    def op(summary: str, responses: dict[int, str], parameters: list[Any]) -> dict[str, Any]:
        return {
            "summary": summary,
            "parameters": parameters,
            "responses": {
                str(code): {"description": text}
                for code, text in {
                    **responses,
                    401: "no or unknown token",
                    403: "token lacks the role",
                    404: "not found in your districts",
                    409: "a recording fails its seal",
                    503: "no data key: nothing is recorded",
                }.items()
            },
        }

    return [
        ApiRoute(
            "GET",
            "/video/events/{event_id}/recordings",
            playback.list,
            "operator",
            op("an alert's recordings and its timeline", {200: "JSON"}, [event]),
        ),
        ApiRoute(
            "GET",
            "/video/events/{event_id}/play",
            playback.play,
            "operator",
            op(
                "play one recording of an alert (audited with operator and reason)",
                {200: "the video", 400: "no operator or reason"},
                [event, index, *query],
            ),
        ),
    ]
