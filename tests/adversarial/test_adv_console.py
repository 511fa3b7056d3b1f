"""The console under attack: every route of its route table (read from the app, so a
route added later is walked too) without a session, with the wrong credential and as an
operator of another district; the video proxy's path traversal; slow clients."""

from __future__ import annotations

import re
from pathlib import Path

from adv_kit import GANGNAM_DOOR, MAPO_BELL, READ_TIMEOUT_S, Site, closed_within, half_sent

from console.operators import Operators
from console.receiver import EventLog, Receiver
from console.web import ConsoleApp
from protocol.clock import wall_ms

VIEWER = "0123456789abcdef"


def console_routes(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path template) of every route the console serves, from its own app."""
    db = tmp_path / "routes.db"
    app = ConsoleApp(Receiver("x" * 16, EventLog(db)), Operators(db)).app()
    found = []
    for route in app.router.routes():
        resource = route.resource
        if route.method == "HEAD" or resource is None or resource.canonical == "/static":
            continue
        found.append((route.method, resource.canonical))
    return found


def fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def sdp_if_video(path: str) -> dict[str, object]:
    if "whep" in path:
        return {"body": b"v=0\r\n", "headers": {"Content-Type": "application/sdp"}}
    return {}


def test_every_route_needs_its_credential(site: Site, tmp_path: Path) -> None:
    ids = {"device_id": MAPO_BELL, "event_id": site.alerts[MAPO_BELL], "stage": "acknowledged",
           "viewer_id": VIEWER, "incident_id": site.alerts[MAPO_BELL],
           "step": "call_victim"}  # fmt: skip
    operator = site.sign_in("mapo-lee")
    walked = 0
    for method, path in console_routes(tmp_path):
        url = fill(path, ids)
        if path == "/events":
            # the gateway's webhook: an operator's session is the wrong credential
            answer = site.console(method, url, operator, body=b"{}")
            assert answer.status in (400, 401), answer.status
        elif path.startswith("/api/") and path != "/api/login":
            answer = site.console(method, url, None, **sdp_if_video(path))  # type: ignore[arg-type]
            assert answer.status == 401, (method, path, answer.status)
            walked += 1
    assert walked >= 8


def test_no_route_lets_a_mapo_operator_see_or_touch_gangnam(site: Site, tmp_path: Path) -> None:
    gangnam_alert = site.alerts[GANGNAM_DOOR]
    kim = site.sign_in("kim")
    # the all-districts operator does see gangnam (so the refusals below are about districts),
    # and leaves gangnam's ids in the audit log
    assert site.console("GET", f"/api/devices/{GANGNAM_DOOR}", kim).status == 200
    before = site.state_of(gangnam_alert)
    lee = site.sign_in("mapo-lee")
    # this gateway groups no incidents: the console names each by its bell's first alert
    gangnam = {"device_id": GANGNAM_DOOR, "event_id": gangnam_alert, "stage": "dispatched",
               "viewer_id": VIEWER, "incident_id": gangnam_alert,
               "step": "call_victim"}  # fmt: skip
    for method, path in console_routes(tmp_path):
        if not path.startswith("/api/") or path in ("/api/login", "/api/logout"):
            continue
        answer = site.console(method, fill(path, gangnam), lee, **sdp_if_video(path))  # type: ignore[arg-type]
        assert answer.status < 500, (method, path, answer.status, answer.text)
        leaked = [s for s in (GANGNAM_DOOR, gangnam_alert) if s in answer.text]
        assert not leaked, f"{method} {path} showed mapo-lee {leaked}: {answer.text[:300]}"
        if "{" in path:
            assert answer.status in (403, 404), (method, path, answer.status)
    assert site.state_of(gangnam_alert) == before
    # mapo-lee's own district is there
    alerts = site.console("GET", "/api/alerts", lee).json()["alerts"]
    assert [a["device_id"] for a in alerts] == [MAPO_BELL]
    # and every refusal is in the audit, as what it was
    audit = site.console("GET", "/api/audit.csv", kim).text
    assert re.search(r"mapo-lee,dispatched," + gangnam_alert + r",.*another district", audit)
    assert re.search(r"mapo-lee,view_video," + GANGNAM_DOOR + r",.*another district", audit)
    assert re.search(r"mapo-lee,view_incident," + gangnam_alert + r",.*another district", audit)
    assert re.search(r"mapo-lee,procedure_step," + gangnam_alert + r",.*another district", audit)
    # and the incident list holds mapo's only
    incidents = site.console("GET", "/api/incidents", lee).json()["incidents"]
    assert [i["device_id"] for i in incidents] == [MAPO_BELL]


def test_the_video_proxy_cannot_be_walked_to_another_gateway_route(site: Site) -> None:
    """Issue 14's attack: `..%2Falerts%2F{id}%2Fclosed` as a device id once closed the alert
    at the gateway with the console's token, and the audit said only "video failed"."""
    alert = site.alerts[GANGNAM_DOOR]
    before = site.state_of(alert)
    kim = site.sign_in("kim")
    attack = f"/api/whep/..%2Falerts%2F{alert}%2Fclosed"
    answer = site.console("POST", attack, kim, body=b"v=0\r\n",
                          headers={"Content-Type": "application/sdp"})  # fmt: skip
    assert answer.status == 400, (answer.status, answer.text)
    assert site.state_of(alert) == before != "closed"
    audit = site.console("GET", "/api/audit.csv", kim).text
    row = next(line for line in audit.splitlines() if "refused_request" in line)
    assert row.split(",")[3:6] == ["kim", "refused_request", "/api/whep/{device_id}"]
    assert "..%2Falerts%2F" in row and "POST" in row


def test_slow_clients_are_closed_and_others_still_served(site: Site) -> None:
    bound = READ_TIMEOUT_S + 3.0
    head = half_sent(site.console_port, b"GET /api/me HTTP/1.1\r\nHost: x\r\nCook")
    body = half_sent(
        site.console_port,
        b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 300\r\n\r\n{"name": "kim", ',
    )
    assert site.console("GET", "/", None).status == 200
    assert closed_within(head, bound) <= bound
    assert closed_within(body, bound) <= bound
    site.sign_in("kim")


def test_hostile_numbers_headers_and_bodies_get_answers_not_tracebacks(site: Site) -> None:
    # issue 14: an unauthenticated `X-Ansimi-Timestamp: ²` on the webhook answered 500
    for stamp in ("²", "-1", "9" * 40, "1e12", "٣"):
        answer = site.console(
            "POST", "/events", None, body=b"{}",
            headers={"X-Ansimi-Timestamp": stamp.encode(), "X-Ansimi-Signature": "x"},
        )  # fmt: skip
        assert answer.status == 400, (stamp, answer.status, answer.text)
    # a fresh timestamp and a signature outside ASCII: a wrong signature, not a 500
    answer = site.console(
        "POST", "/events", None, body=b"{}",
        headers={"X-Ansimi-Timestamp": str(wall_ms()),
                 "X-Ansimi-Signature": ("²" * 32).encode()},
    )  # fmt: skip
    assert answer.status == 401, (answer.status, answer.text)
    kim = site.sign_in("kim")
    # header bytes as UTF-8 (http.client would send latin-1)
    stranger = ("ansimi_session=²".encode(), "")
    assert site.console("GET", "/api/me", stranger).status == 401  # type: ignore[arg-type]
    bad_csrf = site.console("POST", "/api/logout", (kim[0], "²".encode()))  # type: ignore[arg-type]
    assert bad_csrf.status == 403
    for body in (b'{"name": "kim", "password": "\\udcb2"}', b'{"name": "\\udcb2", "password": "x"}',
                 b'{"name": ["kim"], "password": 1}', b"{", b"x" * 70_000):  # fmt: skip
        answer = site.console(
            "POST", "/api/login", None, body=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status in (400, 401, 413), (body[:30], answer.status, answer.text)
    assert site.console("GET", "/api/me", kim).status == 200
