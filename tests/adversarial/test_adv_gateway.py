"""The gateway's HTTP API under attack: every route in its own OpenAPI description is
called unauthenticated, with the wrong role and from the wrong district, then with hostile
ids, numbers, headers and bodies. The routes come from the running gateway, so a route
added later without a scope check makes these tests fail."""

from __future__ import annotations

import re
import socket
from typing import Any

from adv_kit import GANGNAM_DOOR, MAPO_BELL, READ_TIMEOUT_S, TOKENS, Site, closed_within, half_sent

VIEWER = "0123456789abcdef"  # a well-formed viewer id nobody holds


def routes(site: Site) -> list[tuple[str, str, dict[str, Any]]]:
    description = site.gw("GET", "/openapi.json", None).json()
    return [
        (method.upper(), path, operation)
        for path, methods in description["paths"].items()
        for method, operation in methods.items()
    ]


def fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def body_for(operation: dict[str, Any]) -> tuple[bytes | None, dict[str, str]]:
    content = operation.get("requestBody", {}).get("content", {})
    if "application/sdp" in content:
        return b"v=0\r\n", {"Content-Type": "application/sdp"}
    if content:
        return b"{}", {"Content-Type": "application/json"}
    return None, {}


def role_of(operation: dict[str, Any]) -> str:
    security = operation.get("security")
    return "public" if not security else next(iter(security[0]))


def test_every_route_refuses_no_token_and_the_wrong_role(site: Site) -> None:
    ids = {
        "device_id": MAPO_BELL,
        "event_id": site.alerts[MAPO_BELL],
        "viewer_id": VIEWER,
        # the bell's one alert opened its incident, which goes by that alert's id
        "incident_id": site.alerts[MAPO_BELL],
        "step": "call_victim",
        "district": "mapo",
        "version": "1.0.1",
    }
    checked = 0
    for method, path, operation in routes(site):
        role = role_of(operation)
        if role == "public":
            continue
        body, headers = body_for(operation)
        url = fill(path, ids)
        answer = site.gw(method, url, None, body=body, headers=headers)
        assert answer.status == 401, (method, path, answer.status)
        wrong = "admin" if role == "operator" else "mapo-desk"
        answer = site.gw(method, url, wrong, body=body, headers=headers)
        assert answer.status == 403, (method, path, wrong, answer.status)
        checked += 1
    assert checked >= 10  # the walk really walked


def test_no_route_lets_a_mapo_desk_see_or_touch_gangnam(site: Site) -> None:
    gangnam = {
        "device_id": GANGNAM_DOOR,
        "event_id": site.alerts[GANGNAM_DOOR],
        "viewer_id": VIEWER,
        "incident_id": site.alerts[GANGNAM_DOOR],
        "step": "view_camera",
        "district": "gangnam",
        "version": "1.0.1",
    }
    secrets_of_gangnam = [GANGNAM_DOOR, site.alerts[GANGNAM_DOOR]]
    before = site.state_of(site.alerts[GANGNAM_DOOR])
    walked = {path for _, path, _ in routes(site)}
    # the personal-data and live-video routes are among those walked
    assert {"/devices/{device_id}/private", "/whep/{device_id}"} <= walked
    # and the fleet's: remote config by district, rollouts
    assert {"/admin/config/district/{district}", "/admin/rollouts/abort"} <= walked
    for method, path, operation in routes(site):
        role = role_of(operation)
        if role == "public":
            continue  # they hold no data
        # each route with mapo's credential of its role: a desk, or an installer's token
        who = "mapo-desk" if role == "operator" else "mapo-admin"
        body, headers = body_for(operation)
        answer = site.gw(method, fill(path, gangnam), who, body=body, headers=headers)
        assert answer.status < 500, (method, path, answer.status, answer.text)
        leaked = [s for s in secrets_of_gangnam if s in answer.text]
        assert not leaked, f"{method} {path} showed {who} {leaked}: {answer.text[:300]}"
        if "{" in path:
            assert answer.status in (403, 404), (method, path, answer.status)
    # nothing moved, and the bell got no signed ack from a desk of another district; the
    # door is neither revoked nor decommissioned
    assert site.state_of(site.alerts[GANGNAM_DOOR]) == before
    door = site.gw("GET", f"/admin/devices/{GANGNAM_DOOR}", "admin").json()
    assert door["revoked"] is False, door
    # the same desk does reach its own district: the refusals above were about districts
    mine = site.gw("GET", f"/alerts/{site.alerts[MAPO_BELL]}", "mapo-desk")
    assert mine.status == 200 and mine.json()["device_id"] == MAPO_BELL
    listed = site.gw("GET", "/devices", "mapo-desk").json()["devices"]
    assert [d["id"] for d in listed] == [MAPO_BELL]
    assert GANGNAM_DOOR in site.gw("GET", "/devices", "gangnam-desk").text


HOSTILE_IDS = [
    "..%2Falerts%2F{alert}%2Fclosed",
    "..%2F..%2Fadmin%2Fdevices",
    "%C2%B2%C2%B3",  # superscript digits
    "%EB%B2%A8-0001",  # Korean letters
    "bell-0001%00",
    "bell%200001",
    "bell-0001%0A",
    "x" * 300,
    "%252e%252e",
]


def test_hostile_ids_are_refused_before_any_handler(site: Site) -> None:
    alert = site.alerts[GANGNAM_DOOR]
    before = site.state_of(alert)
    for method, path, operation in routes(site):
        if "{" not in path:
            continue
        who = "central" if role_of(operation) == "operator" else "admin"
        body, headers = body_for(operation)
        for hostile in HOSTILE_IDS:
            raw = hostile.format(alert=alert)
            url = re.sub(r"\{\w+\}", raw, path)
            answer = site.gw(method, url, who, body=body, headers=headers)
            # 400 from the id check, before any handler could look it up or pass it on
            assert answer.status == 400, (method, url, answer.status, answer.text)
            assert "is invalid" in answer.json()["error"]
    assert site.state_of(alert) == before
    assert site.gw("GET", "/healthz", None).status == 200


def refusals(site: Site) -> dict[str, float]:
    """ansimi_api_refused_total by reason, as the gateway's /metrics says now."""
    text = site.gw("GET", "/metrics", "central").text
    found = re.finditer(r'ansimi_api_refused_total\{reason="(\w+)"\} (\S+)', text)
    return {m[1]: float(m[2]) for m in found}


def test_hostile_numbers_headers_and_bodies_are_refused_and_counted(site: Site) -> None:
    before = refusals(site)
    # one of each reason here, so the count below does not lean on the other tests
    assert site.gw("GET", "/alerts/..%2Fdevices", "central").status == 400
    assert site.gw("GET", f"/alerts/{site.alerts[GANGNAM_DOOR]}", "mapo-desk").status == 404
    for query in ("limit=%C2%B2", "limit=-1", "limit=1e3", "limit=" + "9" * 40, "limit=%D9%A3"):
        for path in ("/alerts", "/devices"):
            answer = site.gw("GET", f"{path}?{query}", "central")
            assert answer.status == 400, (path, query, answer.status, answer.text)
            assert "whole number" in answer.json()["error"]
    assert site.gw("GET", "/alerts?limit=1", "central").status == 200
    # headers: a unicode token, a huge header, a broken length
    assert site.gw("GET", "/devices", None, headers={"Authorization": "Bearer ²"}).status == 401
    assert site.gw("GET", "/devices", None, headers={"X-Junk": "a" * 20_000}).status in (400, 431)
    bad_length = half_sent(site.gateway_port, b"POST /admin/devices HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Length: \xc2\xb2\r\n\r\n")  # fmt: skip
    reply = bad_length.recv(200)
    bad_length.close()
    assert reply.split(b" ")[1] == b"400", reply
    # bodies: not JSON, JSON of the wrong shape, too big
    for body in (b"{", b"[]", b'{"id": "../x"}', b'{"id": "\xb2"}', b"x" * 70_000):
        answer = site.gw(
            "POST", "/admin/devices", "admin", body=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert answer.status in (400, 413), (body[:20], answer.status, answer.text)
    after = refusals(site)
    for reason in ("bad_id", "bad_number", "district"):
        assert after.get(reason, 0) > before.get(reason, 0), (reason, before, after)
    assert site.gw("GET", "/healthz", None).status == 200


def test_slow_clients_are_closed_and_others_still_served(site: Site) -> None:
    bound = READ_TIMEOUT_S + 3.0  # the sweep's period and a loaded machine's slack
    head = half_sent(site.gateway_port, b"GET /devices HTTP/1.1\r\nHost: x\r\nAuthor")
    body = half_sent(
        site.gateway_port,
        b"POST /admin/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + TOKENS["admin"][2].encode()
        + b'\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"id":',
    )
    idle = socket.create_connection(("127.0.0.1", site.gateway_port), timeout=10)
    # meanwhile, others are served
    assert site.gw("GET", "/healthz", None).status == 200
    assert closed_within(head, bound) <= bound
    assert closed_within(body, bound) <= bound
    assert closed_within(idle, bound) <= bound
    assert site.gw("GET", "/devices", "central").status == 200
