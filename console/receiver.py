"""The control centre's side of forwarding: the webhook the gateway POSTs events to.

It checks the HMAC header (and its timestamp, so an old request cannot be replayed), then
the device's own JWS signature with the key from the gateway's registry (`Directory`), and
that the signed payload says what the delivery says; it keeps each event once by its
idempotency key in SQLite, and hands new ones to listeners (the live page; `ansimi
console --print` prints them).

The HMAC proves the request came from our gateway; the JWS proves the device said it, so
a compromised gateway or a leaked centre secret still cannot invent a press. An event id
belongs to one device: an event reusing the id of another device's event, or naming one
(a cancel of another device's alert, an alert linked to another device's event), is
refused here too, though the gateway already refuses it (defence in depth).

What a later attempt may change is answered 503, which the gateway retries from its
outbox: a device enrolled a moment ago, whose key the console has not fetched yet, or a
gateway whose clock is off by more than the allowed skew, loses nothing. What no retry
changes (a bad signature, a delivery that differs from what was signed, another device's
id) is a 4xx with the reason in `{"error": ...}`: the gateway
parks the delivery as refused with that reason, and shows it to its operators.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ansimi.files import private_database
from console.directory import Directory
from console.errors import ConsoleError
from protocol.clock import Clock, wall_ms
from protocol.errors import ProtocolError, UnknownSigner
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature_matches,
)
from protocol.ids import check_id, check_path_id
from protocol.jws import verify
from protocol.numbers import Malformed, parse_whole

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


# the one refusal that is about the clocks, not the bytes (answered 503: see handle())
OUTSIDE_SKEW = "timestamp outside the allowed skew"


@dataclass(frozen=True, slots=True)
class ReceivedEvent:
    event_id: str
    device_id: str
    district: str
    type: str
    ts_ms: int
    body: dict[str, Any]
    jws: str
    received_ms: int
    signer: str = ""  # the JWS kid that was checked: the device, or a gateway for status
    # the gateway's incident this event belongs to, beside the JWS (not signed by the
    # device: the gateway groups); empty from a gateway older than incidents
    incident_id: str = ""
    kind: str = ""  # the incident's kind (duress, store_robbery, ...) as the gateway says
    priority: int = 0  # the incident's priority, 1 = most urgent; 0 = not given


# what a gateway signs itself about a bell: its connection state, an incident's escalation
GATEWAY_EVENT_TYPES = frozenset({"status", "escalation"})
GATEWAY_ONLY_TYPES = frozenset({"escalation"})  # never signed by a device
# a kind is the gateway's word, shown as the page's own words: a word, nothing else
_KIND_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz_")
MAX_PRIORITY = 99
# added after the first release: an older console.db gets them on open
_INCIDENT_COLUMNS = {
    "incident_id": "TEXT DEFAULT ''",
    "kind": "TEXT DEFAULT ''",
    "priority": "INTEGER DEFAULT 0",
}


class Refused(ConsoleError):
    """A delivery the console will not keep; `status` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class EventLog:
    """Events this centre has accepted, each once."""

    def __init__(self, path: Path | str) -> None:
        # every alert, and the addresses shown beside them: the owner's only
        self._db = sqlite3.connect(private_database(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, device_id TEXT,"
            " district TEXT, type TEXT, ts_ms INTEGER, body TEXT, jws TEXT, received_ms INTEGER)"
        )
        present = {row[1] for row in self._db.execute("PRAGMA table_info(events)")}
        for column, declaration in _INCIDENT_COLUMNS.items():
            if column not in present:
                self._db.execute(f"ALTER TABLE events ADD COLUMN {column} {declaration}")
        # an incident's events are read each time one arrives (the desk's push, web.py)
        self._db.execute("CREATE INDEX IF NOT EXISTS events_by_incident ON events (incident_id)")

    def add(self, event: ReceivedEvent) -> bool:
        """Keep the event; False if this centre already had it (a retry)."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO events (event_id, device_id, district, type, ts_ms, body,"
            " jws, received_ms, incident_id, kind, priority)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                event.event_id,
                event.device_id,
                event.district,
                event.type,
                event.ts_ms,
                json.dumps(event.body),
                event.jws,
                event.received_ms,
                event.incident_id,
                event.kind,
                event.priority,
            ),
        )
        return cursor.rowcount == 1

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def ids(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT event_id FROM events ORDER BY received_ms")]

    def get(self, event_id: str) -> ReceivedEvent | None:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE event_id = ?",  # noqa: S608 (constant)
            (event_id,),
        ).fetchone()
        return _row_event(row) if row else None

    def recent(
        self, since_ms: int, limit: int = 500, districts: Sequence[str] | None = None
    ) -> list[ReceivedEvent]:
        """The newest events since `since_ms`; with `districts`, only theirs and those that
        name none (the caller places those by its registry), so that a busy district's
        events do not push a quiet one's out of `limit`."""
        wanted = None if districts is None else json.dumps(["", *districts])
        return self._where(
            "received_ms >= ? AND (? IS NULL OR district IN (SELECT value FROM json_each(?)))"
            " ORDER BY received_ms DESC LIMIT ?",
            (since_ms, wanted, wanted, limit),
        )

    def of_device(self, device_id: str, limit: int = 200) -> list[ReceivedEvent]:
        """A device's newest events, newest first (its state now: last heard, power)."""
        return self._where("device_id = ? ORDER BY received_ms DESC LIMIT ?", (device_id, limit))

    def of_incident(self, incident_id: str, limit: int = 2000) -> list[ReceivedEvent]:
        """The events the gateway put in one incident, oldest first."""
        return self._where("incident_id = ? ORDER BY received_ms LIMIT ?", (incident_id, limit))

    def _where(self, condition: str, parameters: tuple[Any, ...]) -> list[ReceivedEvent]:
        """The events that meet `condition` (this module's constant SQL, values as ?)."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE {condition}",  # noqa: S608 (constants)
            parameters,
        )
        return [_row_event(r) for r in rows]

    def close(self) -> None:
        self._db.close()


_COLUMNS = (
    "event_id, device_id, district, type, ts_ms, body, jws, received_ms, incident_id, kind,"
    " priority"
)


def _row_event(row: tuple[Any, ...]) -> ReceivedEvent:
    event_id, device_id, district, type_, ts_ms, body, jws, received_ms = row[:8]
    incident_id, kind, priority = row[8:]
    return ReceivedEvent(
        event_id,
        device_id,
        district,
        type_,
        ts_ms,
        json.loads(body),
        jws,
        received_ms,
        incident_id=incident_id or "",
        kind=kind or "",
        priority=priority or 0,
    )


def incident_fields(data: dict[str, Any]) -> tuple[str, str, int]:
    """The incident id, kind and priority the gateway put beside the JWS; ("", "", 0)
    from a gateway older than incidents. ValueError for a value of the wrong kind: a
    delivery is refused as malformed rather than shown under a made-up card."""
    incident_id = data.get("incident_id") or ""
    kind = data.get("kind") or ""
    priority = data.get("priority") or 0
    if incident_id:
        incident_id = check_path_id("incident_id", incident_id)
    if not isinstance(kind, str) or len(kind) > 32 or not set(kind) <= _KIND_CHARS:
        raise ValueError("kind must be a lower-case word")
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be a whole number from 1 to {MAX_PRIORITY}")
    return incident_id, kind, priority


class Receiver:
    def __init__(
        self,
        secret: str,
        events: EventLog,
        *,
        directory: Directory | None = None,
        max_skew_s: float = 300.0,
        clock_ms: Clock | None = None,
    ) -> None:
        """Without a `directory` only the HMAC is checked (a bare test receiver);
        `ansimi console` always passes one."""
        self._secret = secret
        self.events = events
        self.directory = directory
        self._max_skew_ms = int(max_skew_s * 1000)
        self._clock_ms = clock_ms or wall_ms
        self.listeners: list[Callable[[ReceivedEvent], None]] = []
        self.refused = 0
        self.duplicates = 0

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/events", self.handle)]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.content.read(MAX_BODY_BYTES + 1)
        problem = self._check(request, body)
        if problem is None:
            event_or_problem = self._event_of(body)
            if isinstance(event_or_problem, str):
                problem = event_or_problem
        if problem is not None:
            self.refused += 1
            log.warning("receiver: refused a delivery: %s", problem)
            status = 401 if "signature" in problem else 400
            if problem == OUTSIDE_SKEW:
                # the clocks, not these bytes: the same delivery goes through once they
                # agree, so the gateway must retry it (a 4xx would park it for good)
                status = 503
            return web.json_response({"error": problem}, status=status)
        assert not isinstance(event_or_problem, str)
        event, skew = event_or_problem
        if request.headers.get(IDEMPOTENCY_HEADER) != event.event_id:
            self.refused += 1
            return web.json_response({"error": "Idempotency-Key must be the event id"}, status=400)
        if self.directory is not None:
            try:
                signer = await self._check_jws(event, received_at_gateway_ms=event.ts_ms - skew)
            except Refused as exc:
                self.refused += 1
                # the device id is not personal data; the reason says what to fix
                log.warning(
                    "receiver: refused %s from %s: %s", event.event_id, event.device_id, exc
                )
                return web.json_response({"error": str(exc)}, status=exc.status)
            event = dataclasses.replace(event, signer=signer)
        try:
            self._check_ownership(event)
        except Refused as exc:
            self.refused += 1
            log.warning("receiver: refused %s from %s: %s", event.event_id, event.device_id, exc)
            return web.json_response({"error": str(exc)}, status=exc.status)
        if self.events.add(event):
            for listener in self.listeners:
                listener(event)
        else:
            self.duplicates += 1
        return web.json_response({"ok": True, "event_id": event.event_id})

    async def _check_jws(self, event: ReceivedEvent, *, received_at_gateway_ms: int) -> str:
        """The device's own signature over exactly what the delivery says; the signer."""
        assert self.directory is not None
        directory = self.directory
        try:
            try:
                verified = verify(event.jws, directory.key_for)
            except UnknownSigner:
                # enrolled since our last sync, perhaps: ask the registry once, then decide
                await directory.sync(force=False)
                verified = verify(event.jws, directory.key_for)
        except UnknownSigner as exc:
            # 503: the gateway keeps it and retries; the next sync may bring the key
            raise Refused(503, "unknown signer: not in the console's copy of the registry") from exc
        except ProtocolError as exc:
            raise Refused(401, f"device signature: {exc}") from exc
        try:
            payload = json.loads(verified.payload)
        except ValueError as exc:
            raise Refused(400, "signed payload is not JSON") from exc
        if not isinstance(payload, dict):
            raise Refused(400, "signed payload is not a JSON object")
        from_gateway = verified.kid in directory.gateway_keys
        if verified.kid != event.device_id and not (
            from_gateway and event.type in GATEWAY_EVENT_TYPES
        ):
            raise Refused(401, f"signed by {verified.kid}, not by the device {event.device_id}")
        if event.type in GATEWAY_ONLY_TYPES and not from_gateway:
            # a bell cannot escalate its own incident (the gateway refuses it too)
            raise Refused(401, f"a {event.type} event is the gateway's, not a device's")
        claimed = {
            "id": event.event_id,
            "device": event.device_id,
            "type": event.type,
            "ts": event.ts_ms,
            "body": event.body,
        }
        for key, value in claimed.items():
            if payload.get(key) != value:
                raise Refused(400, f"delivery's {key} differs from the signed payload's")
        if not from_gateway and not directory.signed_before_revocation(
            event.device_id, received_at_gateway_ms
        ):
            # 403, not 503: no later sync changes this, and a retryable refusal would
            # count against the centre's circuit breaker at the gateway
            raise Refused(403, f"device {event.device_id} was revoked before this was signed")
        return verified.kid

    def _check_ownership(self, event: ReceivedEvent) -> None:
        """Every id the event uses or names is its own device's, as far as we know them.

        403, not 503: no retry changes whose event an id is."""
        named = {"alert_id", "linked_to"} & event.body.keys()
        refs = [event.body[key] for key in sorted(named) if isinstance(event.body[key], str)]
        for event_id in (event.event_id, *refs):
            known = self.events.get(event_id)
            if known is not None and known.device_id != event.device_id:
                raise Refused(403, f"{event_id} is an event of another device")

    def _check(self, request: web.Request, body: bytes) -> str | None:
        if len(body) > MAX_BODY_BYTES:
            return "body too large"
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        signature = request.headers.get(SIGNATURE_HEADER, "")
        try:
            # strict ASCII: '²' passes isdigit() and then breaks int()
            sent_ms = parse_whole(timestamp, TIMESTAMP_HEADER)
        except Malformed:
            return "timestamp missing or not a whole number"
        if abs(sent_ms - self._clock_ms()) > self._max_skew_ms:
            return OUTSIDE_SKEW
        if not signature_matches(self._secret, timestamp, body, signature):
            return "bad signature"
        return None

    def _event_of(self, body: bytes) -> tuple[ReceivedEvent, int] | str:
        """The delivery's fields, each of its kind (ids in their grammar, the time a JSON
        whole number), with the device clock's skew the gateway flagged (0 if none), or what
        is wrong: even a signed delivery is a 400, never a 500."""
        try:
            data = json.loads(body)
            ts_ms, details = data["ts_ms"], data["body"]
            if type(ts_ms) is not int or not isinstance(details, dict):
                raise ValueError("ts_ms must be a whole number and body an object")
            # The gateway flags a device clock outside its window with the skew
            # (protocol.replay): the signed time minus it is when the gateway received it.
            skew = data.get("clock_skew_ms", 0)
            if skew is None:
                skew = 0
            if type(skew) is not int:
                raise ValueError("clock_skew_ms is not an integer")
            incident_id, kind, priority = incident_fields(data)
            event = ReceivedEvent(
                event_id=check_path_id("event_id", data["event_id"]),
                device_id=check_id(data["device_id"]),
                district=str(data.get("district", "")),
                type=str(data["type"]),
                ts_ms=ts_ms,
                body=details,
                jws=str(data["jws"]),
                received_ms=self._clock_ms(),
                incident_id=incident_id,
                kind=kind,
                priority=priority,
            )
        except (ValueError, KeyError, TypeError) as exc:
            return f"malformed event: {exc}"
        return event, skew

    def app(self) -> web.Application:
        application = web.Application(client_max_size=MAX_BODY_BYTES)
        application.add_routes(self.routes())
        return application
