"""Personal data in the gateway: sealed at rest, set by admins, read by district, forwarded
to centres that may have the address only."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from gw_testkit import (
    ADMIN,
    ALERT,
    CENTRAL,
    CENTRAL_TOML,
    DISTRICTS,
    GANGNAM,
    KEYS,
    PRIVACY_TOKENS,
    make_env,
    signer,
)

from ansimi.privacy import KeyFileError, SealError, create_key_file, load_keyring
from gateway.api import Api
from gateway.cli import gateway
from gateway.config import ApiToken, Centre, ForwardConfig, PrivacyConfig
from gateway.private import PrivateData, PrivateRoutes, Vault, open_vault
from gateway.store import Delivery, Device, SqliteStore
from gateway.transports import HttpsCentre
from protocol.envelope import seal
from protocol.keys import public_key_to_b64
from protocol.messages import Escalation, Status, build_message

MAPO = "mapo-desk-token-01234567"
TOKENS = [
    *PRIVACY_TOKENS,
    ApiToken(name="mapo-desk", role="operator", token=MAPO, districts=["mapo"]),
]
# the fixture's personal data: none of these strings may reach the disk in clear
SECRETS = {
    "address": "17 Seongmisan-ro 5-gil, Mapo-gu",
    "floor": "4F-402",
    "phones": [
        {"role": "victim", "name": "Kim Haneul", "number": "+821055512345"},
        {"role": "guardian", "name": "Park Jiwoo", "number": "+821066698765"},
    ],
    "notes": "door code 7391, call the sister first",
}
PLAINTEXTS = [
    "Seongmisan",
    "4F-402",
    "Kim Haneul",
    "Park Jiwoo",
    "821055512345",
    "821066698765",
    "door code 7391",
]


@dataclass
class Site:
    store: SqliteStore
    db_path: Path
    vault: Vault
    client: TestClient[web.Request, web.Application]

    async def call(
        self, method: str, path: str, token: str, body: object = None
    ) -> tuple[int, dict[str, object]]:
        headers = {"Authorization": f"Bearer {token}"}
        kw = {} if body is None else {"json": body}
        async with self.client.request(method, path, headers=headers, **kw) as response:  # type: ignore[arg-type]
            return response.status, await response.json()


def register(store: SqliteStore) -> None:
    for device_id, district in DISTRICTS.items():
        public = public_key_to_b64(KEYS[device_id].public_key())
        store.database.add_device(Device(device_id, public, "bell", district), now_ms=0)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    db_path = tmp_path / "gateway.db"
    store = SqliteStore(db_path)
    register(store)
    env = await make_env()
    key_file = tmp_path / "privacy.key"
    create_key_file(key_file)
    vault = open_vault(store, PrivacyConfig(key_file=key_file))
    api = Api(store, env.registry, env.downlink, env.metrics, TOKENS, clock_ms=env.clock)
    api.add_routes(PrivateRoutes(store, vault, clock_ms=env.clock).routes())
    async with TestClient(TestServer(api.app())) as client:
        yield Site(store, db_path, vault, client)
    store.database.close()


def raw_bytes(db_path: Path) -> bytes:
    # the database, its write-ahead log and anything else SQLite keeps beside it
    return b"".join(p.read_bytes() for p in sorted(db_path.parent.glob(db_path.name + "*")))


async def test_personal_data_is_sealed_in_the_raw_sqlite_file(site: Site) -> None:
    status, answer = await site.call("POST", "/admin/devices/bell-0001/private", ADMIN, SECRETS)
    assert (status, answer) == (200, {"device_id": "bell-0001", "stored": True})
    raw = raw_bytes(site.db_path)
    assert b"v1." in raw  # the sealed value is there...
    for plain in PLAINTEXTS:  # ...and no plaintext, neither in the file nor in its WAL
        assert plain.encode() not in raw, plain
        assert plain.encode("utf-16-le") not in raw, plain
    # and the same after a checkpoint moved the WAL into the main file
    with sqlite3.connect(site.db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = raw_bytes(site.db_path)
    assert not [p for p in PLAINTEXTS if p.encode() in raw]


async def test_operators_read_it_for_their_districts_only_and_admins_not_at_all(
    site: Site,
) -> None:
    await site.call("POST", "/admin/devices/bell-0001/private", ADMIN, SECRETS)  # mapo
    for token in (CENTRAL, MAPO):
        status, answer = await site.call("GET", "/devices/bell-0001/private", token)
        assert status == 200
        assert answer["address"] == SECRETS["address"]
        assert answer["phones"] == SECRETS["phones"]
    status, answer = await site.call("GET", "/devices/bell-0001/private", GANGNAM)
    assert status == 404 and "Seongmisan" not in json.dumps(answer)
    # a device of no district of yours and no device at all look the same
    assert (await site.call("GET", "/devices/bell-4242/private", GANGNAM))[0] == 404
    assert (await site.call("GET", "/devices/bell-0001/private", ADMIN))[0] == 403
    assert (await site.call("POST", "/admin/devices/bell-0001/private", MAPO, SECRETS))[0] == 403
    assert (await site.call("GET", "/devices/bell-0002/private", CENTRAL))[0] == 404


async def test_a_bad_body_is_refused_without_echoing_it(site: Site) -> None:
    bad = {**SECRETS, "phones": [{"role": "victim", "number": "010-5551-2345 Kim"}]}
    status, answer = await site.call("POST", "/admin/devices/bell-0001/private", ADMIN, bad)
    assert status == 400
    assert "5551" not in json.dumps(answer) and "phones.0.number" in str(answer["error"])
    status, _ = await site.call("POST", "/admin/devices/bell-4242/private", ADMIN, SECRETS)
    assert status == 404


async def test_a_sealed_record_copied_onto_another_device_does_not_open(site: Site) -> None:
    await site.vault.put("bell-0001", PrivateData.model_validate(SECRETS), now_ms=1)
    sealed = site.store.database.private("bell-0001")
    assert sealed is not None
    await site.store.set_private("bell-0002", sealed, now_ms=2)
    with pytest.raises(SealError):
        await site.vault.get("bell-0002")


async def test_without_a_data_key_the_routes_say_503_and_the_log_names_the_fix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteStore(":memory:")
    vault = open_vault(store, PrivacyConfig(key_file=tmp_path / "absent.key"))
    assert not vault.available
    assert "privacy-key init" in caplog.text and "absent.key" in caplog.text
    env = await make_env()
    api = Api(env.store, env.registry, env.downlink, env.metrics, TOKENS)
    api.add_routes(PrivateRoutes(env.store, vault).routes())
    async with TestClient(TestServer(api.app())) as client:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with client.post(
            "/admin/devices/bell-0001/private", json=SECRETS, headers=headers
        ) as response:
            assert response.status == 503


def test_cli_init_then_rotate_reseals_every_record(tmp_path: Path) -> None:
    key_file = tmp_path / "privacy.key"
    db_path = tmp_path / "gateway.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'database = "{db_path}"\n[privacy]\nkey_file = "{key_file}"\n' + CENTRAL_TOML
    )
    runner = CliRunner()
    made = runner.invoke(gateway, ["privacy-key", "init", "--config", str(config)])
    assert made.exit_code == 0, made.output
    store = SqliteStore(db_path)
    register(store)
    vault = open_vault(store, PrivacyConfig(key_file=key_file))
    # the CLI runs its own event loop: this test has none running
    asyncio.run(vault.put("bell-0001", PrivateData.model_validate(SECRETS), now_ms=1))
    old_kid = load_keyring(key_file).current.kid
    again = runner.invoke(gateway, ["privacy-key", "init", "--config", str(config)])
    assert again.exit_code != 0 and "already exists" in again.output
    rotated = runner.invoke(gateway, ["privacy-key", "rotate", "--config", str(config)])
    assert rotated.exit_code == 0, rotated.output
    assert "1 device record" in rotated.output
    ring = load_keyring(key_file)
    assert [k.kid for k in ring.keys] != [old_kid] and len(ring.keys) == 1
    sealed = store.database.private("bell-0001")
    assert sealed is not None and ring.kid_of(sealed) == ring.current.kid
    fresh = open_vault(store, PrivacyConfig(key_file=key_file))
    got = asyncio.run(fresh.get("bell-0001"))
    assert got is not None and got.address == SECRETS["address"]
    store.database.close()


async def test_only_centres_with_send_address_get_the_address(tmp_path: Path) -> None:
    received: list[dict[str, object]] = []

    async def events(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/events", events)
    store = SqliteStore(":memory:")
    register(store)
    create_key_file(tmp_path / "privacy.key")
    vault = open_vault(store, PrivacyConfig(key_file=tmp_path / "privacy.key"))
    await vault.put("bell-0001", PrivateData.model_validate(SECRETS), now_ms=1)
    press = build_message(ALERT, device="bell-0001", seq=1, ts=1)
    token = seal(press, signer("bell-0001"))
    delivery = Delivery(press.id, "central", 0, "bell-0001", "alert", 1, "{}", token)
    # a district's outage, told about its first bell, and that incident's escalation
    dark = Status(state="district_outage", district="mapo", count=1, offline=["bell-0001"])
    told = build_message(dark, device="bell-0001", seq=2, ts=1)
    outage = (told.id, "district_outage", 8)
    step = Escalation(incident=told.id, level=1, to="central", kind="district_outage", priority=8)
    escalated = build_message(step, device="bell-0001", seq=3, ts=1)
    about_the_district = [
        Delivery(
            m.id,
            "central",
            0,
            "bell-0001",
            m.type,
            1,
            m.body.model_dump_json(),
            token,
            None,
            outage,
        )
        for m in (told, escalated)
    ]
    async with TestServer(app) as server:
        url = f"http://127.0.0.1:{server.port}/events"
        secret = "s" * 16
        for send_address in (True, False):
            centre = Centre(name="central", url=url, secret=secret, send_address=send_address)
            transport = HttpsCentre(centre, ForwardConfig(), lambda: 1, vault.address_of)
            assert (await transport.send(delivery, "mapo")).ok
            await transport.aclose()
        # not that bell's person: no address, whatever the centre's send_address
        centre = Centre(name="central", url=url, secret=secret, send_address=True)
        transport = HttpsCentre(centre, ForwardConfig(), lambda: 1, vault.address_of)
        for district_event in about_the_district:
            assert (await transport.send(district_event, "mapo")).ok
        await transport.aclose()
    with_address, without, *districts = received
    assert with_address["address"] == {"address": SECRETS["address"], "floor": "4F-402"}
    assert "address" not in without
    assert [d["type"] for d in districts] == ["status", "escalation"]
    assert not any("address" in d for d in districts)
    assert "Kim Haneul" not in json.dumps(with_address)  # phones and notes never forwarded
    store.database.close()


def test_a_data_key_others_can_read_stops_start_up_with_the_fix(tmp_path: Path) -> None:
    key_file = tmp_path / "privacy.key"
    create_key_file(key_file)
    key_file.chmod(0o640)
    with pytest.raises(KeyFileError, match=rf"chmod 600 {key_file}"):
        open_vault(SqliteStore(":memory:"), PrivacyConfig(key_file=key_file))


async def test_an_address_that_does_not_open_costs_the_address_not_the_alert(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    await site.vault.put("bell-0001", PrivateData.model_validate(SECRETS), now_ms=1)
    sealed = site.store.database.private("bell-0001")
    assert sealed is not None
    await site.store.set_private("bell-0002", sealed, now_ms=2)  # moved: does not open there
    assert await site.vault.address_of("bell-0002") is None
    assert "forwarding bell-0002 without its address" in caplog.text
    assert await site.vault.address_of("bell-0001") == {
        "address": SECRETS["address"],
        "floor": SECRETS["floor"],
    }


async def test_a_record_that_does_not_open_is_a_500_naming_no_data(site: Site) -> None:
    await site.vault.put("bell-0001", PrivateData.model_validate(SECRETS), now_ms=1)
    sealed = site.store.database.private("bell-0001")
    assert sealed is not None
    await site.store.set_private("bell-0002", sealed, now_ms=2)  # bell-0002 is in gangnam
    status, answer = await site.call("GET", "/devices/bell-0002/private", CENTRAL)
    assert status == 500 and "see its log" in str(answer["error"])
    assert "Seongmisan" not in json.dumps(answer)


def test_a_bells_location_is_kept_with_its_address_and_checked() -> None:
    """The desk's map reads the location from the private data (issue 17); off the globe is
    refused like any other bad field, and a bell without one has none."""
    where = {"location": {"lat": 37.5663, "lon": 126.9019}}
    located = PrivateData.model_validate({**SECRETS, **where})
    assert located.location is not None
    assert (located.location.lat, located.location.lon) == (37.5663, 126.9019)
    assert PrivateData.model_validate(SECRETS).location is None
    for bad in ({"lat": 91.0, "lon": 0.0}, {"lat": 0.0, "lon": -181.0}, {"lat": "north"}):
        with pytest.raises(ValueError):
            PrivateData.model_validate({**SECRETS, "location": bad})
