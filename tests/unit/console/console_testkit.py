"""Signed deliveries as the gateway sends them, a fake gateway API, and a console on top.

A plain module (not conftest) so these tests import it by a name no other test tree uses.
Keys are fixed, so failures reproduce byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from console.directory import Directory
from console.gateway_client import INCIDENTS_LISTED, GatewayClient
from console.operators import Operators
from console.receiver import EventLog, Receiver
from console.web import ConsoleApp
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_signature,
)
from protocol.jws import Signer
from protocol.keys import public_key_to_b64
from protocol.messages import Alert, Body, Status, build_message

SECRET = "centre-secret-for-unit-tests"
TOKEN = "console-operator-token-0123"
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes([1]) * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes([2]) * 32)
GATEWAY_KEY = Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32)
PASSWORD = "correct horse battery"
PRESS = Alert(bell="emergency", trigger="press")


def now_ms() -> int:
    return wall_ms()


def registry_entry(device_id: str = "bell-0001", **extra: Any) -> dict[str, Any]:
    return {
        "id": device_id,
        "kind": "bell",
        "district": "mapo",
        "label": "test bell",
        "revoked": False,
        "public_key": public_key_to_b64(DEVICE_KEY.public_key()),
        **extra,
    }


def delivery(
    body: Body = PRESS,
    *,
    device: str = "bell-0001",
    key: Ed25519PrivateKey = DEVICE_KEY,
    kid: str | None = None,
    seq: int = 1,
    ts: int | None = None,
    tamper: dict[str, Any] | None = None,
    district: str = "mapo",
    incident: tuple[str, str, int] | None = None,
) -> dict[str, Any]:
    """A delivery as the gateway POSTs it; `incident`: the (id, kind, priority) a gateway
    with incidents puts beside the JWS (docs/incidents.md)."""
    message = build_message(body, device=device, seq=seq, ts=now_ms() if ts is None else ts)
    token = seal(message, Signer(kid or device, key))
    data = {
        "event_id": message.id,
        "device_id": device,
        "district": district,
        "type": message.type,
        "ts_ms": message.ts,
        "body": json.loads(message.body.model_dump_json()),
        "jws": token,
    }
    if incident is not None:
        data["incident_id"], data["kind"], data["priority"] = incident
    data.update(tamper or {})
    return data


def status_delivery(state: str = "offline") -> dict[str, Any]:
    return delivery(Status(state=state), key=GATEWAY_KEY, kid="gw-test")


def headers_for(
    data: dict[str, Any], secret: str = SECRET, sent_ms: int | None = None
) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(data).encode()
    timestamp = str(now_ms() if sent_ms is None else sent_ms)
    return body, {
        "Content-Type": "application/json",
        IDEMPOTENCY_HEADER: str(data["event_id"]),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: delivery_signature(secret, timestamp, body),
    }


@dataclass
class FakeGateway:
    """The gateway's operator API as far as the console uses it."""

    devices: list[dict[str, Any]] = field(default_factory=lambda: [registry_entry()])
    # what GET /devices/{id}/private answers, per device (absent: 404)
    private: dict[str, dict[str, Any]] = field(default_factory=dict)
    moves: list[tuple[str, str]] = field(default_factory=list)
    device_reads: int = 0
    tokens_seen: list[str] = field(default_factory=list)
    # incidents as GET /incidents/{id} answers them (docs/incidents.md), by id
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (incident id, stage or "procedure/<step>", X-Ansimi-Operator, outcome) as received
    incident_calls: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    # False: a gateway older than incidents (its incident routes do not exist)
    has_incidents: bool = True
    listing_status: int = 200  # what GET /incidents answers (500: a gateway in trouble)
    listings: int = 0  # GET /incidents answered
    listing_limit: int = 500  # what GET /incidents answers at most without ?limit=

    def open_incident(
        self,
        incident_id: str,
        device_id: str = "bell-0001",
        kind: str = "stalking",
        priority: int = 4,
        *,
        district: str = "mapo",
        procedure: tuple[str, ...] = ("call_victim", "request_dispatch"),
        opened_ms: int | None = None,
    ) -> dict[str, Any]:
        """An open incident as the gateway would hold it, with a checklist of `procedure`,
        opened at `opened_ms` (default: now)."""
        opened_ms = now_ms() if opened_ms is None else opened_ms
        incident: dict[str, Any] = {
            "id": incident_id,
            "device_id": device_id,
            "district": district,
            "kind": kind,
            "priority": priority,
            "state": "new",
            "opened_ms": opened_ms,
            "updated_ms": opened_ms,
            "first_alert_id": incident_id,
            "events": 1,
            "offline": False,
            "escalation_level": 0,
            "escalated_to": [],
            "outcome": None,
            "stages": {},
            "history": [],
            "procedure": [
                {"step": step, "ko": f"{step} (ko)", "en": step.replace("_", " "), "done": None}
                for step in procedure
            ],
        }
        self.incidents[incident_id] = incident
        return incident

    def _incident_routes(self) -> list[web.RouteDef]:
        def summary(incident: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in incident.items() if k not in ("history", "procedure")}

        async def listing(request: web.Request) -> web.Response:
            self.listings += 1
            if self.listing_status != 200:
                return web.json_response({"error": "trouble"}, status=self.listing_status)
            # as the gateway lists them: the most urgent first, 500 unless told
            open_ = [summary(i) for i in self.incidents.values() if i["state"] != "closed"]
            open_.sort(key=lambda i: (i["priority"], i["opened_ms"]))
            limit = int(request.query.get("limit", self.listing_limit))
            return web.json_response({"incidents": open_[:limit]})

        async def one(request: web.Request) -> web.Response:
            incident = self.incidents.get(request.match_info["incident_id"])
            if incident is None:
                return web.json_response({"error": "no such incident"}, status=404)
            return web.json_response(incident)

        async def move(request: web.Request) -> web.Response:
            incident = self.incidents.get(request.match_info["incident_id"])
            stage = request.match_info["stage"]
            operator = request.headers.get("X-Ansimi-Operator", "")
            body = await request.json() if request.can_read_body else {}
            outcome = body.get("outcome")
            self.incident_calls.append(
                (request.match_info["incident_id"], stage, operator, outcome)
            )
            if incident is None:
                return web.json_response({"error": "no such incident"}, status=404)
            if stage == "closed" and outcome is None:
                return web.json_response({"error": "closing needs an outcome"}, status=400)
            incident["state"] = stage
            incident["stages"][stage] = {"at_ms": now_ms(), "actor": f"console/{operator}"}
            incident["outcome"] = outcome
            return web.json_response(summary(incident))

        async def tick(request: web.Request) -> web.Response:
            incident = self.incidents.get(request.match_info["incident_id"])
            step = request.match_info["step"]
            operator = request.headers.get("X-Ansimi-Operator", "")
            self.incident_calls.append(
                (request.match_info["incident_id"], f"procedure/{step}", operator, None)
            )
            todo = [p for p in (incident or {}).get("procedure", []) if p["step"] == step]
            if incident is None or not todo:
                return web.json_response({"error": "no such step"}, status=404)
            todo[0]["done"] = todo[0]["done"] or {"at_ms": now_ms(), "actor": operator}
            return web.json_response(incident)

        return [
            web.get("/incidents", listing),
            web.get("/incidents/{incident_id}", one),
            web.post("/incidents/{incident_id}/procedure/{step}", tick),
            web.post("/incidents/{incident_id}/{stage}", move),
        ]

    def app(self) -> web.Application:
        async def devices(request: web.Request) -> web.Response:
            self.device_reads += 1
            self.tokens_seen.append(request.headers.get("Authorization", ""))
            return web.json_response({"devices": self.devices})

        async def move(request: web.Request) -> web.Response:
            self.tokens_seen.append(request.headers.get("Authorization", ""))
            self.moves.append((request.match_info["event_id"], request.match_info["stage"]))
            return web.json_response({"moved": True, "state": request.match_info["stage"]})

        async def private(request: web.Request) -> web.Response:
            data = self.private.get(request.match_info["device_id"])
            if data is None:
                return web.json_response({"error": "no personal data"}, status=404)
            return web.json_response({"device_id": request.match_info["device_id"], **data})

        app = web.Application()
        app.add_routes(
            [
                web.get("/devices", devices),
                web.get("/devices/{device_id}/private", private),
                web.post("/alerts/{event_id}/{stage}", move),
            ]
        )
        if self.has_incidents:
            app.add_routes(self._incident_routes())
        return app


@dataclass
class Desk:
    console: ConsoleApp
    client: TestClient[web.Request, web.Application]
    gateway: FakeGateway
    csrf: str = ""

    async def sign_in(self, name: str = "kim", password: str = PASSWORD) -> int:
        async with self.client.post(
            "/api/login", json={"name": name, "password": password}
        ) as response:
            if response.status == 200:
                self.csrf = (await response.json())["csrf"]
            return response.status

    async def deliver(
        self, data: dict[str, Any], secret: str = SECRET, sent_ms: int | None = None
    ) -> tuple[int, Any]:
        """POST as the gateway does, its clock at `sent_ms` (default: ours)."""
        body, headers = headers_for(data, secret, sent_ms)
        async with self.client.post("/events", data=body, headers=headers) as response:
            return response.status, await response.json()


@asynccontextmanager
async def desk(
    tmp_path: Path,
    gateway: FakeGateway | None = None,
    *,
    clock_ms: Callable[[], int] | None = None,
    districts: dict[str, list[str]] | None = None,
    gateway_sync_s: float | None = None,
    incidents_limit: int = INCIDENTS_LISTED,
) -> AsyncIterator[Desk]:
    """A console on a fake gateway, with operator kim (all districts) and one operator per
    entry of `districts` (name -> its districts), all with PASSWORD; without
    `gateway_sync_s` the console syncs with the gateway only when a test calls it."""
    gateway = gateway or FakeGateway()
    async with TestServer(gateway.app()) as gateway_server:
        client_of_gateway = GatewayClient(
            str(gateway_server.make_url("")), TOKEN, incidents_limit=incidents_limit
        )
        directory = Directory(
            tmp_path / "console.db",
            client_of_gateway.devices,
            gateway_keys={"gw-test": GATEWAY_KEY.public_key()},
            min_refresh_gap_s=0.0,
        )
        await directory.sync()
        receiver = Receiver(SECRET, EventLog(tmp_path / "console.db"), directory=directory)
        operators = Operators(tmp_path / "console.db")
        operators.add("kim", PASSWORD)
        for name, served in (districts or {}).items():
            operators.add(name, PASSWORD, served)
        console = ConsoleApp(
            receiver,
            operators,
            directory=directory,
            gateway=client_of_gateway,
            clock_ms=clock_ms,
            gateway_sync_s=gateway_sync_s,
        )
        async with TestClient(TestServer(console.app())) as client:
            yield Desk(console, client, gateway)
        await client_of_gateway.close()
        receiver.events.close()
        operators.close()
        directory.close()
