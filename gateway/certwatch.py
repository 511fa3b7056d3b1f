"""Certificates before they expire: a bell whose certificate runs out goes silent at the broker.

The gateway knows every device certificate the site CA issued (the site keeps a copy of each,
siteca.site.Site.issued), the site CA's own, and its API certificate. Each is a Prometheus
gauge (`ansimi_certificate_expiry_timestamp_seconds`, labelled subject, kind and district);
one within `warn_days` of expiry is an alarm: a `cert_expiring` status signed by the gateway,
about the device for the centres of its district, or about the gateway itself (site CA, API
certificate) for the site's HTTPS centres. A device that renews gets a newer certificate,
and only the newest unrevoked one of each device counts, so a renewed bell raises nothing.

Told once per certificate (by serial) while the gateway runs; after a restart, once again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from aiohttp import web
from cryptography import x509
from prometheus_client import Gauge

from gateway.api import TOKEN_KEY, ApiRoute, _op
from gateway.downlink import Downlink
from gateway.metrics import Metrics
from gateway.store import Incoming
from gateway.supervise import RouteOf
from protocol.clock import wall_ms
from protocol.messages import Status

# what the centres get about a certificate near its end (the subject is the envelope's)
EXPIRING = Status(state="cert_expiring")
log = logging.getLogger(__name__)

DAY_MS: Final = 86_400_000
CHECK_S: Final = 3600.0

CertKind = Literal["device", "site_ca", "gateway"]


class CertStore(Protocol):
    async def add_event(self, item: Incoming, now_ms: int) -> None: ...
    # about the gateway itself, which is no device (as disk_low)
    async def add_site_event(self, item: Incoming, now_ms: int) -> None: ...


@dataclass(frozen=True, slots=True)
class CertExpiry:
    subject: str  # the device id, or the certificate's CN for the site's own
    kind: CertKind
    serial: str
    not_after_ms: int


def _expiry(cert: x509.Certificate, kind: CertKind) -> CertExpiry:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    subject = str(names[0].value) if names else "?"
    not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
    return CertExpiry(subject, kind, f"{cert.serial_number:X}", not_after)


def newest_per_subject(
    issued: Iterable[x509.Certificate], revoked_serials: set[int], gateway_id: str
) -> list[CertExpiry]:
    """The certificate each device (and the gateway's MQTT client) uses: its newest
    unrevoked one, since a renewal replaces it."""
    newest: dict[str, x509.Certificate] = {}
    for cert in issued:
        if cert.serial_number in revoked_serials:
            continue
        name = _expiry(cert, "device").subject
        held = newest.get(name)
        if held is None or cert.not_valid_after_utc > held.not_valid_after_utc:
            newest[name] = cert
    return [
        _expiry(cert, "gateway" if name == gateway_id else "device")
        for name, cert in newest.items()
    ]


def site_certificates(site_dir: Path, api_cert_file: Path | None) -> list[CertExpiry]:
    """The site's device certificates, its CA's, and the gateway's API certificate."""
    from siteca import pki
    from siteca.site import Site

    site = Site.open(site_dir)
    revoked = {r.serial for r in site.revocations().revoked}
    found = newest_per_subject(site.issued(), revoked, site.gateway_id)
    found.append(_expiry(pki.read_cert(site.layout.ca_cert), "site_ca"))
    if api_cert_file is not None:
        found.append(_expiry(pki.read_cert(api_cert_file), "gateway"))
    return found


class CertWatch:
    def __init__(
        self,
        store: CertStore,
        downlink: Downlink,
        metrics: Metrics,
        *,
        gateway_id: str,
        route_of: RouteOf,
        district_of: Callable[[str], str],
        site_centres: tuple[str, ...],
        warn_days: float = 30.0,
        clock_ms: Callable[[], int] | None = None,
        on_event: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._downlink = downlink
        self._gateway_id = gateway_id
        self._route_of = route_of
        self._district_of = district_of
        self._site_centres = site_centres
        self._warn_ms = int(warn_days * DAY_MS)
        self._clock_ms = clock_ms or wall_ms
        self._on_event = on_event
        self._told: set[str] = set()  # serials already alarmed
        self.known: list[CertExpiry] = []
        self.expiry = Gauge(
            "ansimi_certificate_expiry_timestamp_seconds",
            "When each certificate in use expires (devices: the newest unrevoked one)",
            ["subject", "kind", "district"],
            registry=metrics.registry,
        )

    async def check(self, certs: list[CertExpiry]) -> list[CertExpiry]:
        """Record `certs` and raise an alarm for each newly near its end; those alarmed."""
        now = self._clock_ms()
        self.known = certs
        alarmed: list[CertExpiry] = []
        for cert in certs:
            district = self._district_of(cert.subject) if cert.kind == "device" else ""
            self.expiry.labels(cert.subject, cert.kind, district).set(cert.not_after_ms / 1000)
            if cert.not_after_ms - now > self._warn_ms or cert.serial in self._told:
                continue
            if await self._alarm(cert, now):
                self._told.add(cert.serial)
                alarmed.append(cert)
        if alarmed and self._on_event is not None:
            self._on_event()
        return alarmed

    async def _alarm(self, cert: CertExpiry, now: int) -> bool:
        when = dt.datetime.fromtimestamp(cert.not_after_ms / 1000, dt.UTC).date().isoformat()
        log.warning(
            "certificate %s of %s (%s) expires %s and has not been renewed",
            cert.serial,
            cert.subject,
            cert.kind,
            when,
        )
        if cert.kind == "device":
            centres = self._route_of(cert.subject)
            if not centres:
                return False  # revoked or routed nowhere: nobody to tell
            event = self._downlink.event(cert.subject, EXPIRING, centres)
            await self._store.add_event(event, now)
            return True
        if not self._site_centres:
            return False
        event = self._downlink.event(self._gateway_id, EXPIRING, self._site_centres)
        await self._store.add_site_event(event, now)
        return True

    def routes(self) -> list[ApiRoute]:
        return [
            ApiRoute(
                "GET",
                "/certificates",
                self.listing,
                "operator",
                _op(
                    "certificates in use and when each expires, soonest first (own districts)",
                    [200, 401, 403],
                ),
            )
        ]

    async def listing(self, request: web.Request) -> web.Response:
        rows = [
            {
                "subject": c.subject,
                "kind": c.kind,
                "district": self._district_of(c.subject) if c.kind == "device" else "",
                "serial": c.serial,
                "not_after_ms": c.not_after_ms,
                "alarmed": c.serial in self._told,
            }
            for c in sorted(self.known, key=lambda c: c.not_after_ms)
        ]
        # a district's desk sees its own bells' and the site's certificates
        districts = request[TOKEN_KEY].districts
        if "*" not in districts:
            rows = [r for r in rows if r["district"] in ("", *districts)]
        return web.json_response({"certificates": rows})

    async def run(self, read: Callable[[], list[CertExpiry]]) -> None:
        while True:
            try:
                await self.check(await asyncio.to_thread(read))
            except Exception:
                # a damaged site file must not stop the gateway: said every hour until fixed
                log.exception("certificates: expiry check failed")
            await asyncio.sleep(CHECK_S)
