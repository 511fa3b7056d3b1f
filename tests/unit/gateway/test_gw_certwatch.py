"""Certificate expiry known and alarmed: devices (newest unrevoked), the site CA, the API's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from gw_testkit import DISTRICTS, GATEWAY, ROUTES, Env

from gateway.api import Api
from gateway.certwatch import DAY_MS, CertWatch, site_certificates
from gateway.config import ApiToken
from siteca import pki
from siteca.site import Site, init_site

NOW = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)
SITE_CENTRES = ("central",)


def route(device_id: str) -> tuple[str, ...] | None:
    district = DISTRICTS.get(device_id)
    return None if district is None else ROUTES[district]


def make_watch(env: Env) -> CertWatch:
    return CertWatch(
        env.store,
        env.downlink,
        env.metrics,
        gateway_id=GATEWAY,
        route_of=route,
        district_of=lambda d: DISTRICTS.get(d, ""),
        site_centres=SITE_CENTRES,
        clock_ms=env.clock,
    )


def alarms(env: Env) -> list[tuple[str, str]]:
    """(about, centre) of each cert_expiring delivery due."""
    found = []
    centres = sorted({*SITE_CENTRES, *(c for r in ROUTES.values() for c in r)})
    # asked per centre, as the forwarder does: the gateway's own events name no device
    for centre in centres:
        due = env.store.database.due_for(centre, env.clock.ms, 1000)
        found += [(m.device, centre) for m in env.gateway_statuses(due, "cert_expiring")]
    return found


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    init_site(tmp_path / "site", site="unit", port=18883, now=NOW)
    return Site.open(tmp_path / "site")


def issue(site: Site, device_id: str, days: int) -> dt.datetime:
    key = pki.generate_key()
    return site.issue_client_cert(device_id, key.public_key(), days, now=NOW).not_valid_after_utc


async def test_a_certificate_near_its_end_is_alarmed_once_and_a_renewed_one_is_not(
    env: Env, site: Site
) -> None:
    issue(site, "bell-0001", 40)
    issue(site, "bell-0002", 40)
    renewed = issue(site, "bell-0002", 400)  # bell-0002 renewed: its newer certificate counts
    env.clock.ms = int(NOW.timestamp() * 1000)
    watch = make_watch(env)
    certs = site_certificates(site.layout.root, None)
    assert await watch.check(certs) == []  # 40 days left: not yet
    env.clock.ms += 10 * DAY_MS + 1  # the clock run forward past the warning point
    (alarmed,) = await watch.check(site_certificates(site.layout.root, None))
    assert (alarmed.subject, alarmed.kind) == ("bell-0001", "device")
    assert sorted(alarms(env)) == sorted(("bell-0001", c) for c in ROUTES["mapo"])
    assert await watch.check(certs) == []  # told once
    sample = env.metrics.registry.get_sample_value(
        "ansimi_certificate_expiry_timestamp_seconds",
        {"subject": "bell-0002", "kind": "device", "district": DISTRICTS["bell-0002"]},
    )
    assert sample == renewed.timestamp()


async def test_the_site_ca_and_the_api_certificate_are_alarmed_about_the_gateway(
    env: Env, site: Site, tmp_path: Path
) -> None:
    ca = pki.read_cert(site.layout.ca_cert)
    # the API's certificate: signed by the site CA, not recorded among the issued
    api = pki.issue_client_cert(site.ca(), "gw-api", pki.generate_key().public_key(), 90, now=NOW)
    pki.write_cert(tmp_path / "api.crt", api)
    env.clock.ms = int(ca.not_valid_after_utc.timestamp() * 1000) - 29 * DAY_MS
    watch = make_watch(env)
    alarmed = await watch.check(site_certificates(site.layout.root, tmp_path / "api.crt"))
    ca_name = _cn(ca)
    # the CA, the API certificate, and the gateway's MQTT client certificate the CA issued
    assert {(a.subject, a.kind) for a in alarmed} == {
        (ca_name, "site_ca"),
        ("gw-api", "gateway"),
        (site.gateway_id, "gateway"),
    }
    assert alarms(env) == [(GATEWAY, "central")] * 3


async def test_the_certificates_are_listed_soonest_first_to_each_desk_its_own(
    env: Env, site: Site
) -> None:
    issue(site, "bell-0001", 40)  # mapo
    issue(site, "bell-0002", 30)
    watch = make_watch(env)
    await watch.check(site_certificates(site.layout.root, None))
    everyone, mapo = "operator-token-0123456", "mapo-desk-token-012345"
    tokens = [
        ApiToken(name="central", role="operator", token=everyone),
        ApiToken(name="mapo-desk", role="operator", token=mapo, districts=["mapo"]),
    ]
    api = Api(env.store, env.registry, env.downlink, env.metrics, tokens, connected=lambda: True)
    api.add_routes(watch.routes())
    async with TestClient(TestServer(api.app())) as client:

        async def listed(token: str) -> list[tuple[str, str]]:
            headers = {"Authorization": f"Bearer {token}"}
            async with client.get("/certificates", headers=headers) as response:
                assert response.status == 200
                rows = (await response.json())["certificates"]
            assert [r["not_after_ms"] for r in rows] == sorted(r["not_after_ms"] for r in rows)
            return [(r["subject"], r["kind"]) for r in rows]

        every = await listed(everyone)
        assert {s for s, k in every if k == "device"} == {"bell-0001", "bell-0002"}
        own = await listed(mapo)
        assert {s for s, k in own if k == "device"} == {
            d for d in ("bell-0001", "bell-0002") if DISTRICTS[d] == "mapo"
        }
        assert {k for _, k in own} >= {"site_ca", "gateway"}
