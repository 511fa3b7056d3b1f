"""The gateway's enrolment routes (gateway/enrol.py) inside the real Api, on a real site CA."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from ansimi_testkit import nowhere_centre
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ansimi_edge.cli import cli
from gateway.api import Api
from gateway.config import ApiToken
from gateway.downlink import Downlink
from gateway.enrol import Enrolment, EnrolmentInfo, SiteSigner
from gateway.enrolments import hash_token
from gateway.intake import Registry
from gateway.metrics import Metrics
from gateway.store import SqliteStore
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.renewal import renew_request
from provisioning.revoke import revoke_certificate
from siteca import pki
from siteca.site import Site, init_site

ADMIN = "admin-secret-0123456789"
OPERATOR = "operator-secret-0123456789"
MAPO_ADMIN = "mapo-admin-secret-0123456"
NOW = 1_800_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ms = NOW

    def __call__(self) -> int:
        return self.ms


@dataclass
class Env:
    client: TestClient[Any, Any]
    store: SqliteStore
    tokens: SqliteStore  # the same store: enrolment is one of its roles
    registry: Registry
    clock: Clock
    site: Site

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        answer = await self.client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        return answer.status, await answer.json()

    async def add(self, device_id: str = "bell-0001", **extra: Any) -> str:
        status, body = await self.admin(
            "POST",
            "/admin/enrolments",
            {"device_id": device_id, "kind": "bell", "district": "mapo", **extra},
        )
        assert status == 201, body
        return str(body["token"])

    async def enrol(
        self, token: str, device_id: str = "bell-0001", key: Any = None
    ) -> tuple[int, Any]:
        key = key if key is not None else generate_key()
        csr = pki.make_csr(key, device_id).decode()
        answer = await self.client.post(
            "/enrol", json={"token": token, "device_id": device_id, "csr_pem": csr}
        )
        return answer.status, await answer.json()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    init_site(tmp_path / "site", site="unit", listen_host="127.0.0.1", port=18883)
    site = Site.open(tmp_path / "site")
    store = SqliteStore(tmp_path / "gateway.db")
    tokens = store
    registry = Registry(store)
    clock = Clock()
    signer = Signer(site.gateway_id, generate_key())
    loop = asyncio.get_running_loop()

    def publish(topic: str, payload: bytes) -> asyncio.Future[None]:
        done: asyncio.Future[None] = loop.create_future()
        done.set_result(None)
        return done

    api = Api(
        store,
        registry,
        Downlink(signer, publish),
        Metrics(),
        [
            ApiToken(name="installer", role="admin", token=ADMIN),
            ApiToken(name="desk", role="operator", token=OPERATOR),
            ApiToken(name="mapo-installer", role="admin", token=MAPO_ADMIN, districts=["mapo"]),
        ],
        clock_ms=clock,
    )
    enrolment = Enrolment(
        tokens,
        SiteSigner(site.layout.root),
        EnrolmentInfo.from_site(site.layout.root),
        refresh=registry.refresh,
        device=registry.device,
        clock_ms=clock,
    )
    api.add_routes(enrolment.routes())
    async with TestClient(TestServer(api.app())) as client:
        yield Env(client, store, tokens, registry, clock, site)
    await store.close()


async def test_a_token_enrols_its_device_once_with_the_key_from_the_csr(env: Env) -> None:
    token = await env.add(label="front door")
    key = generate_key()
    status, body = await env.enrol(token, key=key)
    assert status == 200, body
    cert = x509.load_pem_x509_certificate(body["cert_pem"].encode())
    assert pki.common_name(cert) == "bell-0001"
    pki.verify_issued_by(env.site.ca().cert, cert)
    assert body["gateway_id"] == env.site.gateway_id
    assert body["gateway_public_key"] == env.site.layout.gateway_pub.read_text().strip()
    assert body["broker"] == {"host": "127.0.0.1", "port": 18883}
    assert body["ca_pem"] == env.site.layout.ca_cert.read_text()
    # the device's message key is the CSR's key, and the gateway's registry knows it now
    device = env.store.database.device("bell-0001")
    assert device is not None
    assert device.public_key == public_key_to_b64(key.public_key())
    assert (device.kind, device.district, device.label) == ("bell", "mapo", "front door")
    assert env.registry.device("bell-0001") is not None
    # the site recorded the certificate, so revocation by id finds it
    assert [c.serial_number for c in env.site.issued() if pki.common_name(c) == "bell-0001"] == [
        cert.serial_number
    ]

    status, body = await env.enrol(token)
    assert (status, body["reason"]) == (403, "used")
    assert "used already" in body["error"]


async def test_an_expired_token_is_refused_and_registers_nothing(env: Env) -> None:
    token = await env.add(ttl_s=3600)
    env.clock.ms += 3600 * 1000 + 1
    status, body = await env.enrol(token)
    assert (status, body["reason"]) == (403, "expired")
    assert env.store.database.device("bell-0001") is None


async def test_refusals_name_the_reason(env: Env) -> None:
    token = await env.add()
    status, body = await env.enrol(token, device_id="bell-0002")
    assert (status, body["reason"]) == (403, "wrong-device")
    status, body = await env.enrol("bell-0001." + "x" * 43)
    assert (status, body["reason"]) == (403, "unknown")
    assert env.store.database.device("bell-0001") is None


async def test_a_refused_csr_leaves_the_token_usable(env: Env) -> None:
    token = await env.add()
    p256 = ec.generate_private_key(ec.SECP256R1())
    status, body = await env.enrol(token, key=p256)
    assert status == 422 and "Ed25519" in body["error"]
    assert not [c for c in env.site.issued() if pki.common_name(c) == "bell-0001"]
    # a CSR for another name than the token's device
    other = pki.make_csr(Ed25519PrivateKey.generate(), "bell-0002").decode()
    answer = await env.client.post(
        "/enrol", json={"token": token, "device_id": "bell-0001", "csr_pem": other}
    )
    assert answer.status == 422
    status, body = await env.enrol(token)
    assert status == 200, body


async def test_duplicate_ids_and_unknown_districts_are_refused(env: Env) -> None:
    await env.add()
    status, body = await env.admin(
        "POST", "/admin/enrolments", {"device_id": "bell-0001", "kind": "bell", "district": "mapo"}
    )
    assert status == 409 and "waiting" in body["error"]
    status, body = await env.admin(
        "POST", "/admin/enrolments", {"device_id": "bell-0002", "kind": "bell", "district": "mappo"}
    )
    assert status == 400 and 'did you mean "mapo"' in body["error"]
    token = await env.add("bell-0003")
    assert (await env.enrol(token, "bell-0003"))[0] == 200
    status, body = await env.admin(
        "POST", "/admin/enrolments", {"device_id": "bell-0003", "kind": "bell", "district": "mapo"}
    )
    assert status == 409 and "already registered" in body["error"]


async def test_a_gateway_id_is_never_enrolled(env: Env) -> None:
    token = await env.add("gw-other")
    status, body = await env.enrol(token, "gw-other")
    assert status == 422 and "reserved" in body["error"]


async def test_rotation_rekeys_the_device_and_keeps_its_record(env: Env) -> None:
    assert (await env.enrol(await env.add(label="shop")))[0] == 200
    status, body = await env.admin(
        "POST", "/admin/enrolments", {"device_id": "bell-0001", "rotate": True}
    )
    assert status == 201 and body["rotate"] is True
    new_key = generate_key()
    status, answer = await env.enrol(body["token"], key=new_key)
    assert status == 200 and answer["rotated"] is True
    device = env.store.database.device("bell-0001")
    assert device is not None
    assert device.public_key == public_key_to_b64(new_key.public_key())
    assert (device.district, device.label) == ("mapo", "shop")
    # a device never enrolled cannot be rotated
    status, body = await env.admin(
        "POST", "/admin/enrolments", {"device_id": "bell-0009", "rotate": True}
    )
    assert status == 404


async def test_admin_routes_need_an_admin_token(env: Env) -> None:
    body = {"device_id": "bell-0001", "kind": "bell", "district": "mapo"}
    answer = await env.client.post("/admin/enrolments", json=body)
    assert answer.status == 401
    answer = await env.client.post(
        "/admin/enrolments", json=body, headers={"Authorization": f"Bearer {OPERATOR}"}
    )
    assert answer.status == 403
    answer = await env.client.get("/openapi.json")
    paths = (await answer.json())["paths"]
    assert {"/enrol", "/admin/enrolments", "/admin/enrolments/{device_id}"} <= set(paths)


async def test_only_the_hash_is_kept_and_nothing_secret_is_logged(
    env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = await env.add()
    await env.enrol(token)
    await env.enrol(token)
    secret = token.partition(".")[2]
    assert secret not in caplog.text
    raw = (tmp_path / "gateway.db").read_bytes() + (tmp_path / "gateway.db-wal").read_bytes()
    assert secret.encode() not in raw
    assert hash_token(token).encode() in raw
    status, listed = await env.admin("GET", "/admin/enrolments")
    assert status == 200 and secret not in str(listed)
    assert listed["enrolments"][0]["state"] == "used"


async def test_cancelled_tokens_are_refused(env: Env) -> None:
    token = await env.add()
    status, body = await env.admin("DELETE", "/admin/enrolments/bell-0001")
    assert (status, body["cancelled"]) == (200, 1)
    status, body = await env.enrol(token)
    assert (status, body["reason"]) == (403, "cancelled")


def test_the_gateway_serves_enrolment_only_when_configured_with_a_site(tmp_path: Path) -> None:
    from gateway.config import ApiConfig, EnrolConfig, GatewayConfig
    from gateway.enrol import attach_if_site

    init_site(tmp_path / "site", site="unit", port=18883)
    lay = Site.open(tmp_path / "site").layout
    api_on = ApiConfig(enabled=True, tokens=[ApiToken(name="installer", role="admin", token=ADMIN)])
    in_site = GatewayConfig(
        centres=[nowhere_centre()],
        signing_key=lay.gateway_key,
        database=tmp_path / "g.db",
        api=api_on,
        enrol=EnrolConfig(site_dir=lay.root),
    )
    elsewhere = in_site.model_copy(update={"enrol": EnrolConfig()})
    not_a_site = in_site.model_copy(update={"enrol": EnrolConfig(site_dir=tmp_path)})
    api_off = in_site.model_copy(update={"api": ApiConfig()})

    store = SqliteStore(tmp_path / "g.db")
    registry = Registry(store)

    def api() -> Api:
        loop = asyncio.new_event_loop()
        downlink = Downlink(Signer("gw-unit", generate_key()), lambda t, p: loop.create_future())
        loop.close()
        return Api(store, registry, downlink, Metrics(), api_on.tokens)

    assert attach_if_site(api(), registry, store, elsewhere) is None
    assert attach_if_site(api(), registry, store, not_a_site) is None
    assert attach_if_site(api(), registry, store, api_off) is None
    with_site = api()
    enrolment = attach_if_site(with_site, registry, store, in_site)
    assert enrolment is not None
    assert enrolment.store is store  # it enrols into the gateway's own store
    assert ("POST", "/enrol") in {(r.method, r.path) for r in with_site.routes}
    store.database.close()


async def test_an_admin_of_one_district_enrols_and_rotates_only_there(env: Env) -> None:
    """A rotation re-keys a device: with another district's, a mapo installer's token would
    take that device's identity over."""
    gangnam = await env.add("bell-0002", district="gangnam")
    assert (await env.enrol(gangnam, "bell-0002"))[0] == 200

    async def as_mapo(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        answer = await env.client.request(
            method, path, json=body, headers={"Authorization": f"Bearer {MAPO_ADMIN}"}
        )
        return answer.status, await answer.json()

    new = {"device_id": "bell-0003", "kind": "bell", "district": "gangnam"}
    status, body = await as_mapo("POST", "/admin/enrolments", new)
    assert status == 403 and "gangnam is not one of this token's" in body["error"]
    # another district's device cannot be rotated: the same answer as for an unknown one
    status, body = await as_mapo(
        "POST", "/admin/enrolments", {"device_id": "bell-0002", "rotate": True}
    )
    assert status == 404 and "not enrolled" in body["error"]
    assert [r.device_id for r in await env.tokens.enrolments(None)] == [
        "bell-0002"
    ]  # nothing issued
    # its own district, it may; and the list holds only its own district's records
    assert (await as_mapo("POST", "/admin/enrolments", {**new, "district": "mapo"}))[0] == 201
    status, listed = await as_mapo("GET", "/admin/enrolments")
    assert status == 200 and [r["device_id"] for r in listed["enrolments"]] == ["bell-0003"]


async def test_enrolment_hands_out_the_release_public_key_once_the_site_has_one(
    env: Env,
) -> None:
    status, body = await env.enrol(await env.add())
    assert status == 200 and body["release_public_key"] == ""  # no release key yet: none pinned
    root = env.site.layout.root
    made = CliRunner().invoke(cli, ["provision", "release", "key", "init", "--dir", str(root)])
    assert made.exit_code == 0, made.output
    info = EnrolmentInfo.from_site(root)
    assert info.release_public_key == env.site.layout.release_pub.read_text().strip()
    assert info.release_public_key in made.output


async def test_a_device_whose_certificate_was_revoked_cannot_renew_it(env: Env) -> None:
    key = generate_key()
    status, body = await env.enrol(await env.add(), key=key)
    assert status == 200, body

    async def renew() -> tuple[int, Any]:
        csr = pki.make_csr(key, "bell-0001").decode()
        request = renew_request(Signer("bell-0001", key), csr, env.clock.ms)
        answer = await env.client.post("/renew", json=request.model_dump())
        return answer.status, await answer.json()

    status, body = await renew()
    assert status == 200, body
    # revoked at the CA only (`ansimi provision revoke`): the broker refuses the certificate,
    # and the key alone must not get the bell a new one the CRL does not name
    revoke_certificate(env.site.layout.root, "cn:bell-0001")
    issued = len(env.site.issued())
    status, body = await renew()
    assert status == 403, body
    assert len(env.site.issued()) == issued
