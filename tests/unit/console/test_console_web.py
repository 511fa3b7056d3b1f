"""The operators' side: sign-in, sessions, CSRF, actions through the gateway, audit, stream."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from console_testkit import OTHER_KEY, PASSWORD, TOKEN, FakeGateway, delivery, desk, registry_entry

from console.operators import OperatorExists, Operators, hash_password, password_matches
from console.web import LOGIN_FREE_FAILURES, login_delay_ms
from protocol.keys import public_key_to_b64
from protocol.messages import Cancel


def test_passwords_are_salted_scrypt_and_checked() -> None:
    one, two = hash_password("a password here"), hash_password("a password here")
    assert one != two and one.startswith("scrypt$16384$8$1$")
    assert password_matches("a password here", one)
    assert not password_matches("a password herE", one)
    assert not password_matches("anything", "garbage")


def test_names_and_passwords_are_checked_when_added(tmp_path: Path) -> None:
    ops = Operators(tmp_path / "c.db")
    ops.add("kim", "long enough password")
    for name, password in [("Kim Lee", "long enough password"), ("lee", "short")]:
        with pytest.raises(ValueError):
            ops.add(name, password)
    with pytest.raises(OperatorExists):
        ops.add("kim", "another long password")
    assert ops.names() == ["kim"]
    assert ops.check_password("kim", "long enough password")
    assert not ops.check_password("kim", "wrong password!!")
    assert not ops.check_password("nobody", "long enough password")


async def test_nothing_without_signing_in(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        for path in ("/api/me", "/api/alerts", "/api/stream", "/api/devices/bell-0001"):
            async with d.client.get(path) as response:
                assert response.status == 401, path
        assert await d.sign_in(password="not the password") == 401
        async with d.client.get("/") as response:
            page = await response.text()
            assert response.status == 200 and "/static/app.js" in page
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]


async def test_the_session_cookie_is_httponly_and_strict(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        async with d.client.post(
            "/api/login", json={"name": "kim", "password": "correct horse battery"}
        ) as response:
            cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        token = cookie.split(";")[0].split("=", 1)[1]
        assert len(token) >= 40
        # only its hash is stored
        assert token not in (tmp_path / "console.db").read_bytes().decode("latin-1")


async def test_posts_need_the_csrf_token(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        data = delivery()
        await d.deliver(data)
        path = f"/api/alerts/{data['event_id']}/acknowledged"
        async with d.client.post(path) as response:
            assert response.status == 403
        async with d.client.post(path, headers={"X-CSRF-Token": "x" * 43}) as response:
            assert response.status == 403
        assert d.gateway.moves == []
        async with d.client.post(
            "/api/login",
            json={"name": "kim", "password": "correct horse battery"},
            headers={"Origin": "http://evil.example"},
        ) as response:
            assert response.status == 403


async def test_acknowledge_goes_through_the_gateway_and_is_audited(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        data = delivery()
        await d.deliver(data)
        event_id = data["event_id"]
        headers = {"X-CSRF-Token": d.csrf}
        async with d.client.post(f"/api/alerts/{event_id}/acknowledged", headers=headers) as r:
            assert r.status == 200
        assert d.gateway.moves == [(event_id, "acknowledged")]
        # the console's token went to the gateway; the browser never saw it
        assert d.gateway.tokens_seen[-1] == f"Bearer {TOKEN}"
        async with d.client.get("/api/alerts") as r:
            (alert,) = (await r.json())["alerts"]
        assert alert["stage"] == "acknowledged" and alert["stages"][0]["operator"] == "kim"
        async with d.client.post(f"/api/alerts/{event_id}/closed", headers=headers) as r:
            assert r.status == 200
        async with d.client.get("/api/alerts") as r:
            assert (await r.json())["alerts"] == []
        actions = [(row[2], row[3], row[4]) for row in d.console.operators.audit_rows()]
        assert ("kim", "acknowledged", event_id) in actions
        assert ("kim", "closed", event_id) in actions


async def test_an_address_view_is_audited_and_never_stored(tmp_path: Path) -> None:
    gateway = FakeGateway(
        devices=[registry_entry(), registry_entry("bell-0002", address="Mapo-gu 1-2")],
        private={
            "bell-0002": {
                "address": "Mapo-gu 1-2",
                "floor": "3",
                "phones": [
                    {"role": "guardian", "number": "+821099998888"},
                    {"role": "victim", "number": "+821012345678"},
                ],
                "notes": "door code 1234",
                "location": {"lat": 37.5663, "lon": 126.9019},
            }
        },
    )
    async with desk(tmp_path, gateway) as d:
        await d.sign_in()
        async with d.client.get("/api/devices/bell-0001") as r:
            assert (await r.json())["address"] is None
        async with d.client.get("/api/devices/bell-0002") as r:
            shown = await r.json()
        assert (shown["address"], shown["floor"]) == ("Mapo-gu 1-2", "3")
        # what the operator needs on the card (issue 17): the victim's number first
        assert [p["number"] for p in shown["phones"]] == ["+821012345678", "+821099998888"]
        assert shown["notes"] == "door code 1234"
        assert (shown["lat"], shown["lon"]) == (37.5663, 126.9019)
        async with d.client.get("/api/audit.csv") as r:
            assert r.content_type == "text/csv"
            rows = list(csv.DictReader(io.StringIO(await r.text())))
        views = [(x["operator"], x["action"], x["target"]) for x in rows]
        assert ("kim", "view_personal_data", "bell-0001") in views
        assert ("kim", "view_personal_data", "bell-0002") in views
        assert ("kim", "login", "console") in views
    # neither the audit log nor the registry copy holds the address, even though the
    # registry's answer carried one
    for name in ("console.db", "console.db-wal"):
        if (tmp_path / name).exists():
            kept = (tmp_path / name).read_bytes()
            assert b"Mapo-gu" not in kept and b"+821012345678" not in kept
            assert b"door code" not in kept


async def test_a_new_event_reaches_an_open_page_at_once(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        async with d.client.get("/api/stream") as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            hello = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
            assert b"event: hello" in hello
            data = delivery()
            await d.deliver(data)
            frame = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
        kind, payload = frame.decode().strip().split("\n")
        assert kind == "event: event"
        event = json.loads(payload.removeprefix("data: "))
        assert event["event_id"] == data["event_id"] and event["active"]
        assert event["label"] == "test bell" and "address" not in event


async def test_sign_out_ends_the_session(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        async with d.client.post("/api/logout", headers={"X-CSRF-Token": d.csrf}) as r:
            assert r.status == 200
        async with d.client.get("/api/me") as r:
            assert r.status == 401


async def test_repeated_failed_sign_ins_are_slowed_and_audited(tmp_path: Path) -> None:
    clock = [1_000_000]
    async with desk(tmp_path, clock_ms=lambda: clock[0]) as d:
        for _ in range(LOGIN_FREE_FAILURES):
            assert await d.sign_in(password="wrong password!") == 401
        # now even the right password waits, and is told for how long
        async with d.client.post(
            "/api/login", json={"name": "kim", "password": PASSWORD}
        ) as response:
            assert response.status == 429
            first_wait_s = int(response.headers["Retry-After"])
        clock[0] += first_wait_s * 1000
        assert await d.sign_in(password="wrong password!") == 401
        # the next wait is longer: a delay that grows, not a lock
        async with d.client.post(
            "/api/login", json={"name": "kim", "password": PASSWORD}
        ) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) > first_wait_s
        clock[0] += login_delay_ms(LOGIN_FREE_FAILURES + 1)
        assert await d.sign_in() == 200
        actions = [row[3] for row in d.console.operators.audit_rows()]
        assert actions.count("login_failed") == LOGIN_FREE_FAILURES + 1
        assert "login_refused" in actions


async def test_nobody_elsewhere_can_lock_an_operator_out(tmp_path: Path) -> None:
    """The failures of an attacker at another address do not slow the operator's desk."""
    async with desk(tmp_path) as d:
        attacker = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=attacker) as elsewhere:
            url = d.client.make_url("/api/login")
            statuses = []
            for _ in range(LOGIN_FREE_FAILURES + 3):
                async with elsewhere.post(url, json={"name": "kim", "password": "guess!"}) as r:
                    statuses.append(r.status)
        assert statuses[-1] == 429  # the attacker is slowed down...
        assert await d.sign_in() == 200  # ...the operator at their own desk is not


async def test_guesses_sent_all_at_once_are_slowed_like_guesses_in_a_row(tmp_path: Path) -> None:
    """The password check is awaited (scrypt, off the loop): guesses sent together must not
    all pass the delay check before the first failure is counted."""
    async with desk(tmp_path, clock_ms=lambda: 1_000_000) as d:  # no time passes

        async def guess() -> int:
            async with d.client.post(
                "/api/login", json={"name": "kim", "password": "wrong password!"}
            ) as response:
                return response.status

        statuses = await asyncio.gather(*(guess() for _ in range(LOGIN_FREE_FAILURES + 10)))
        assert sorted(statuses) == [401] * LOGIN_FREE_FAILURES + [429] * 10


async def test_made_up_names_do_not_flush_the_delay_of_one_being_guessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("console.web.LOGIN_KEYS_MAX", 20)
    async with desk(tmp_path, clock_ms=lambda: 1_000_000) as d:
        for _ in range(LOGIN_FREE_FAILURES):
            assert await d.sign_in(password="wrong password!") == 401
        for n in range(30):  # fills the table past its bound, one failure each
            assert await d.sign_in(f"nobody-{n}", "wrong password!") == 401
        assert await d.sign_in() == 429  # kim's guesser is still slowed down


async def test_the_page_learns_what_keeps_alerts_away(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        async with d.client.get("/api/me") as r:
            me = await r.json()
        assert me["registry"] == {"devices": 1, "synced": True} and me["refused"] == 0
        await d.deliver(delivery(device="bell-0404"))  # a signer the registry lacks
        async with d.client.get("/api/me") as r:
            assert (await r.json())["refused"] == 1


def two_districts() -> FakeGateway:
    return FakeGateway(devices=[registry_entry(), registry_entry("bell-0002", district="gangnam")])


async def test_an_operator_sees_and_acts_only_in_their_districts(tmp_path: Path) -> None:
    async with desk(tmp_path, two_districts(), districts={"lee": ["gangnam"]}) as d:
        mapo = delivery()
        gangnam = delivery(device="bell-0002", district="gangnam")
        for data in (mapo, gangnam):
            assert (await d.deliver(data))[0] == 200
        await d.sign_in("lee")
        headers = {"X-CSRF-Token": d.csrf}
        async with d.client.get("/api/alerts") as r:
            shown = await r.json()
        assert [a["event_id"] for a in shown["alerts"]] == [gangnam["event_id"]]
        refused = [
            ("POST", f"/api/alerts/{mapo['event_id']}/dispatched"),
            ("GET", "/api/devices/bell-0001"),
            ("POST", "/api/whep/bell-0001"),  # live video of another district's door
        ]
        sdp = {**headers, "Content-Type": "application/sdp"}
        unknown = [
            ("POST", "/api/alerts/no-such-alert-01/dispatched"),
            ("GET", "/api/devices/bell-0404"),
            ("POST", "/api/whep/bell-0404"),
        ]
        for (method, path), (_, unknown_path) in zip(refused, unknown, strict=True):
            async with d.client.request(method, path, headers=sdp, data=b"v=0") as r:
                assert r.status == 404, path
                answer = await r.text()
                assert "bell-0001" not in answer and mapo["event_id"] not in answer
            async with d.client.request(method, unknown_path, headers=sdp, data=b"v=0") as r:
                assert (r.status, await r.text()) == (404, answer), "told apart from unknown"
        assert d.gateway.moves == []  # nothing reached the gateway
        async with d.client.get("/api/audit.csv") as r:
            assert r.status == 403  # names devices of every district
        async with d.client.post(
            f"/api/alerts/{gangnam['event_id']}/acknowledged", headers=headers
        ) as r:
            assert r.status == 200
        refusals = [
            (row[3], row[4])
            for row in d.console.operators.audit_rows()
            if "another district" in row[5]
        ]
        assert refusals == [
            ("dispatched", mapo["event_id"]),
            ("view_personal_data", "bell-0001"),
            ("view_video", "bell-0001"),
        ]


async def test_a_busy_district_does_not_push_a_quiet_ones_alerts_off_its_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("console.web.RECENT_LIMIT", 3)
    async with desk(tmp_path, two_districts(), districts={"lee": ["gangnam"]}) as d:
        gangnam = delivery(device="bell-0002", district="gangnam")
        assert (await d.deliver(gangnam))[0] == 200
        for seq in range(3):  # newer, and as many as a page loads
            assert (await d.deliver(delivery(seq=seq + 1)))[0] == 200
        await d.sign_in("lee")
        async with d.client.get("/api/alerts") as r:
            shown = await r.json()
        assert [a["event_id"] for a in shown["alerts"]] == [gangnam["event_id"]]


async def test_a_page_streams_only_its_operators_districts(tmp_path: Path) -> None:
    async with desk(tmp_path, two_districts(), districts={"lee": ["gangnam"]}) as d:
        await d.sign_in("lee")
        async with d.client.get("/api/stream") as stream:
            await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)  # hello
            mapo = delivery()
            gangnam = delivery(device="bell-0002", district="gangnam")
            await d.deliver(mapo)
            await d.deliver(gangnam)
            frame = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), 5)
        assert gangnam["event_id"] in frame.decode() and mapo["event_id"] not in frame.decode()


async def test_a_hostile_id_is_refused_and_audited_as_attempted(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        data = delivery()
        await d.deliver(data)
        attack = f"/api/whep/..%2Falerts%2F{data['event_id']}%2Fclosed"
        async with d.client.post(
            attack, data=b"v=0", headers={"X-CSRF-Token": d.csrf, "Content-Type": "application/sdp"}
        ) as r:
            assert r.status == 400
        assert d.gateway.moves == []
        row = d.console.operators.audit_rows()[-1]
        assert row[2:5] == ("kim", "refused_request", "/api/whep/{device_id}")
        detail = json.loads(row[5])
        assert detail["method"] == "POST" and detail["path"] == attack


async def test_an_id_is_checked_on_every_route_not_only_behind_a_session(
    tmp_path: Path,
) -> None:
    """A later route outside /api/ (a public page, a second webhook) gets the same check."""
    async with desk(tmp_path) as d:
        reached: list[str] = []

        async def page(request: web.Request) -> web.Response:
            reached.append(request.match_info["device_id"])
            return web.Response(text="ok")

        app = d.console.app()
        app.router.add_get("/page/{device_id}", page)
        async with TestClient(TestServer(app)) as client:
            async with client.get("/page/..%2Fapi%2Faudit.csv") as r:
                assert r.status == 400 and "is invalid" in (await r.text())
            async with client.get("/page/bell-0001") as r:
                assert r.status == 200
            async with client.get("/static/app.js") as r:
                assert r.status == 200  # a file name is not an id
        assert reached == ["bell-0001"]


async def test_the_gateway_client_quotes_every_path_segment(tmp_path: Path) -> None:
    """The second wall: even an unchecked id stays one segment of the gateway's URL."""
    async with desk(tmp_path) as d:
        client = d.console.gateway
        assert client is not None
        url = client._url("whep", "../alerts/x/closed")
        assert url.raw_path.endswith("/whep/..%2Falerts%2Fx%2Fclosed")


def test_operators_from_before_districts_keep_all_and_new_ones_are_checked(tmp_path: Path) -> None:
    import sqlite3

    from console.operators import BadDistrict

    old = sqlite3.connect(tmp_path / "old.db")
    old.execute(
        "CREATE TABLE operators (name TEXT PRIMARY KEY, pw_hash TEXT NOT NULL,"
        " created_ms INTEGER NOT NULL, disabled INTEGER NOT NULL DEFAULT 0)"
    )
    old.execute("INSERT INTO operators VALUES ('kim', ?, 0, 0)", (hash_password("x" * 12),))
    old.commit()
    old.close()
    operators = Operators(tmp_path / "old.db")
    _, session = operators.open_session("kim")
    assert session.districts == ("*",) and session.sees("gangnam")
    operators.add("lee", "y" * 12, ["mapo", "jongno"])
    _, lee = operators.open_session("lee")
    assert lee.sees("mapo") and not lee.sees("gangnam")
    with pytest.raises(BadDistrict):
        operators.add("park", "z" * 12, ["mapoo"])
    operators.close()


async def test_a_cancel_marks_only_its_own_devices_alert_cancelled(tmp_path: Path) -> None:
    """A cancel from bell-0002 naming an id that is not known yet (so the receiver cannot
    tell whose it is) must not mark bell-0001's alert under that id cancelled."""
    gateway = FakeGateway()
    gateway.devices.append(
        registry_entry("bell-0002", public_key=public_key_to_b64(OTHER_KEY.public_key()))
    )
    async with desk(tmp_path, gateway) as d:
        await d.console.receiver.directory.sync()  # type: ignore[union-attr]
        await d.sign_in()
        press = delivery()
        early = delivery(Cancel(alert_id=press["event_id"]), device="bell-0002", key=OTHER_KEY)
        assert (await d.deliver(early))[0] == 200
        assert (await d.deliver(press))[0] == 200

        async def cancelled() -> bool:
            async with d.client.get("/api/alerts") as r:
                (alert,) = (await r.json())["alerts"]
            assert alert["event_id"] == press["event_id"]
            return bool(alert["cancelled"])

        assert not await cancelled()
        own = delivery(Cancel(alert_id=press["event_id"]), seq=2)
        assert (await d.deliver(own))[0] == 200
        assert await cancelled()


def test_a_test_press_is_shown_below_news_and_never_as_an_active_alert() -> None:
    from console.receiver import ReceivedEvent
    from console.web import is_active_alert, urgency

    def alert(trigger: str) -> ReceivedEvent:
        body = {"bell": "emergency", "trigger": trigger}
        return ReceivedEvent("e1", "bell-1", "mapo", "alert", 0, body, "jws", 0)

    assert not is_active_alert(alert("test"))
    assert urgency(alert("test")) > urgency(alert("power_restored")) > urgency(alert("press"))
