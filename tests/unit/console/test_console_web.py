"""The operators' side: sign-in, sessions, CSRF, actions through the gateway, audit, stream."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pytest
from console_testkit import OTHER_KEY, TOKEN, FakeGateway, delivery, desk, registry_entry

from console.operators import OperatorExists, Operators, hash_password, password_matches
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
                "phones": [{"number": "+821012345678"}],
                "notes": "door code 1234",
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
        # phone numbers and notes stay at the gateway
        assert "+821012345678" not in json.dumps(shown) and "1234" not in json.dumps(shown)
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
            assert b"Mapo-gu" not in (tmp_path / name).read_bytes()


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
    async with desk(tmp_path) as d:
        for _ in range(5):
            assert await d.sign_in(password="wrong password!") == 401
        # now even the right password waits
        assert await d.sign_in() == 429
        actions = [row[3] for row in d.console.operators.audit_rows()]
        assert actions.count("login_failed") == 5 and "login_refused" in actions


async def test_the_page_learns_what_keeps_alerts_away(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        await d.sign_in()
        async with d.client.get("/api/me") as r:
            me = await r.json()
        assert me["registry"] == {"devices": 1, "synced": True} and me["refused"] == 0
        await d.deliver(delivery(device="bell-0404"))  # a signer the registry lacks
        async with d.client.get("/api/me") as r:
            assert (await r.json())["refused"] == 1


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
