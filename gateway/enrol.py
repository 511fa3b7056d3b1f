"""Enrolment: one-time tokens, and the endpoint a device trades one for its certificate.

The installer registers a device (`POST /admin/enrolments`, admin token) and gets back a
token: 256 random bits, valid for 24 h by default, kept here only as its SHA-256 (the
token has full entropy, so a slow hash would add nothing; a stolen database yields no
usable token). The device then sends `POST /enrol` with the token, its id and a CSR made
on the device; the gateway checks the token (known, for that device, unexpired, unused,
not cancelled), has the site CA sign the CSR, and answers with everything the device
needs: its certificate, the CA certificate, the gateway's id and public key, and where
the broker is.

Decisions, and what they cost:

- **One key per device, for TLS and for messages.** The CSR's key is the device's Ed25519
  message-signing key; the gateway records the CSR's public key as the key its messages
  must verify with. The CSR's signature proves the device holds that key, so no one can
  register a key they do not hold (a separate message key would need its own proof of
  possession). One secret to protect, one to rotate: a rotation replaces both at once.
  The cost: a device whose TLS key lives in a P-256-only secure element could not use it
  for messages; such a device is refused here ("Ed25519 only") until one is needed.
- **The gateway reads the site CA key** (through `CsrSigner`; `SiteSigner` opens the site
  directory). At one site the gateway, broker and site directory share one machine and one
  administrator anyway. The cost: whoever takes over the gateway process can mint a
  certificate for any id. A small signing service on a Unix socket, which only signs CSRs
  for ids with a live token, would keep the key out of the internet-facing process; it
  only needs to implement `CsrSigner`.
- **The token and the device row change in one transaction.** The tokens live in the
  gateway's store (its `EnrolmentStore` role), and completing an enrolment marks the token
  used and inserts (or, for a rotation, re-keys) the device row in the same transaction: a
  crash leaves either a used token and a registered device, or neither. A gateway given
  another store enrols into that store.
- **Admin routes live here too.** `POST /admin/devices` needs the device's public key,
  which does not exist until the device makes it; registering the device's *intent*
  (id, kind, district, label) with its token is the enrolment's own record.

- **On when the gateway runs from a site.** `attach_if_site` (called by the gateway
  service) adds these routes when the gateway's signing key is the `gateway/gateway.key` of
  a site directory made by `ansimi provision init-site` and its API is enabled; devices
  enrol only over HTTPS, so the API needs `api.cert_file`/`api.key_file` too. An explicit
  `[enrol] site_dir` in gateway.toml would be clearer; this needs no new option meanwhile.

Nothing here logs a token or a key: only device ids and why a request was refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ansimi.districts import UnknownDistrict, check_district
from gateway.api import TOKEN_KEY, Api, ApiRoute
from gateway.config import GatewayConfig
from gateway.enrolments import (
    DEFAULT_TTL_S,
    CsrRefused,
    EnrolmentError,
    Pending,
)
from gateway.intake import Registry
from gateway.metrics import Metrics
from gateway.store import Device, DeviceKind, EnrolmentStore
from protocol.clock import wall_ms
from protocol.errors import ProtocolError
from protocol.ids import DeviceId
from protocol.keys import public_key_from_b64, public_key_to_b64
from protocol.renewal import RenewRequest, check_renew_request

log = logging.getLogger(__name__)

MAX_TTL_S: Final = 14 * 24 * 3600
MAX_CSR_BYTES: Final = 8 * 1024
# a renewal's proof is this fresh or refused (the gateway's default replay window)
RENEW_WINDOW_MS: Final = 300_000


# ---- signing -------------------------------------------------------------------------------


class RenewalRefused(EnrolmentError, PermissionError):
    """A renewal not signed by the device's registered key, or for a device not enrolled."""

    status = 403

    def __init__(self, message: str) -> None:
        super().__init__(message, "renewal-refused")


class CsrSigner(Protocol):
    """Has the site CA sign a device's CSR, for exactly `device_id`."""

    def sign(self, csr_pem: bytes, device_id: str) -> x509.Certificate: ...

    def renew(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        """`sign`, for a device that holds an unrevoked certificate of the CSR's key."""
        ...


@dataclass(frozen=True, slots=True)
class SiteSigner:
    """Signs with the CA of a site directory (`ansimi provision init-site`) and records
    the certificate there, so `ansimi provision device revoke` finds it."""

    site_dir: Path

    def sign(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        from siteca.site import Site

        return Site.open(self.site_dir).sign_csr(csr_pem, device_id)

    def renew(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        # the renewal is authenticated by the device's current certificate, not its key
        # alone: one revoked (a stolen bell, `ansimi provision revoke`) must not get a new one
        from siteca import pki
        from siteca.site import Site

        site = Site.open(self.site_dir)
        key = x509.load_pem_x509_csr(csr_pem).public_key()
        revoked = {r.serial for r in site.revocations().revoked}
        if not any(
            pki.common_name(cert) == device_id
            and cert.public_key() == key
            and cert.serial_number not in revoked
            for cert in site.issued()
        ):
            raise RenewalRefused(
                f"device {device_id} holds no unrevoked certificate for this key: enrol it again"
            )
        return site.sign_csr(csr_pem, device_id)


@dataclass(frozen=True, slots=True)
class EnrolmentInfo:
    """What every enrolled device is told besides its own certificate."""

    gateway_id: str
    gateway_public_key: str  # raw Ed25519, base64url
    broker_host: str
    broker_port: int
    ca_pem: str
    # the site's release public key, pinned by devices for agent updates ("" if none yet)
    release_public_key: str = ""

    @classmethod
    def from_site(cls, site_dir: Path, *, broker_host: str | None = None) -> EnrolmentInfo:
        from siteca.site import Site

        site = Site.open(site_dir)
        host = broker_host or (
            site.info.broker_names[0] if site.info.broker_names else site.local_broker_address()[0]
        )
        return cls(
            gateway_id=site.gateway_id,
            gateway_public_key=site.layout.gateway_pub.read_text().strip(),
            broker_host=host,
            broker_port=site.info.listen_port,
            ca_pem=site.layout.ca_cert.read_text(),
            release_public_key=(
                site.layout.release_pub.read_text().strip()
                if site.layout.release_pub.exists()
                else ""
            ),
        )


# ---- HTTP ----------------------------------------------------------------------------------


class EnrolRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    token: Annotated[str, StringConstraints(min_length=16, max_length=200)]
    device_id: DeviceId
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CSR_BYTES)]


class NewEnrolment(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device_id: DeviceId
    kind: DeviceKind = "bell"
    district: Annotated[str, StringConstraints(max_length=40)] = ""
    label: Annotated[str, StringConstraints(max_length=200)] = ""
    ttl_s: Annotated[int, Field(ge=60, le=MAX_TTL_S)] = DEFAULT_TTL_S
    rotate: bool = False


def _error(exc: EnrolmentError) -> web.Response:
    return web.json_response({"error": str(exc), "reason": exc.reason}, status=exc.status)


def _bad_body(exc: ValidationError) -> web.Response:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return web.json_response(
        {"error": f"{where}: {first['msg']}", "reason": "bad-request"}, status=400
    )


_ED25519_ONLY: Final = (
    "the CSR's key must be Ed25519: it also signs the device's messages "
    "(`ansimi device enrol` makes one)"
)


def _check_csr_key(csr_pem: str) -> None:
    """Refuse a non-Ed25519 key before the CA signs (and records) anything."""
    try:
        key = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    except ValueError:
        return  # the signer says what is wrong with it
    if not isinstance(key, Ed25519PublicKey):
        raise CsrRefused(_ED25519_ONLY)


def _ed25519_key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise CsrRefused(_ED25519_ONLY)
    return public_key_to_b64(key)


class Enrolment:
    """The enrolment routes, for `Api.add_routes()`."""

    def __init__(
        self,
        store: EnrolmentStore,
        signer: CsrSigner,
        info: EnrolmentInfo,
        *,
        refresh: Callable[[str], Awaitable[None]] | None = None,
        device: Callable[[str], Device | None] | None = None,
        metrics: Metrics | None = None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._metrics = metrics
        self._store = store
        # the registry's device, for renewals (signed with the key it holds); None: no renewal
        self._device = device
        self._signer = signer
        self._info = info
        # the gateway's registry caches devices: told when one is added or re-keyed
        self._refresh = refresh
        self._clock_ms = clock_ms or wall_ms
        # one enrolment at a time: two requests with one token must not both be signed
        self._lock = asyncio.Lock()

    @property
    def store(self) -> EnrolmentStore:
        return self._store

    def routes(self) -> list[ApiRoute]:
        json_body = {"content": {"application/json": {"schema": {"type": "object"}}}}
        described = {
            "200": {"description": "OK"},
            "201": {"description": "created"},
            "400": {"description": "bad request (or unknown district)"},
            "401": {"description": "no or unknown token"},
            "403": {"description": "token refused (expired, used, other device) or wrong role"},
            "404": {"description": "not found"},
            "409": {"description": "the device id is taken"},
            "422": {"description": "CSR refused"},
        }

        def op(summary: str, codes: list[str], **extra: Any) -> dict[str, Any]:
            return {"summary": summary, "responses": {c: described[c] for c in codes}, **extra}

        device_param = {
            "name": "device_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
        }
        return [
            ApiRoute(
                "POST",
                "/enrol",
                self.enrol,
                # the one-time token in the body is the credential
                "public",
                op(
                    "trade a one-time token and a CSR for a certificate",
                    ["200", "400", "403", "409", "422"],
                    requestBody=json_body,
                ),
            ),
            ApiRoute(
                "POST",
                "/renew",
                self.renew,
                # the device's signature over its CSR (protocol/renewal.py) is the credential
                "public",
                op(
                    "a device renews its certificate: a CSR for its current key, signed by it",
                    ["200", "400", "403", "422"],
                    requestBody=json_body,
                ),
            ),
            ApiRoute(
                "POST",
                "/admin/enrolments",
                self.create,
                "admin",
                op(
                    "register a device to enrol, or rotate one: returns its one-time token",
                    ["201", "400", "401", "403", "404", "409"],
                    requestBody=json_body,
                ),
            ),
            ApiRoute(
                "GET",
                "/admin/enrolments",
                self.records,
                "admin",
                op("enrolment records (never tokens)", ["200", "401", "403"]),
            ),
            ApiRoute(
                "DELETE",
                "/admin/enrolments/{device_id}",
                self.cancel,
                "admin",
                op(
                    "cancel a device's unused tokens",
                    ["200", "401", "403"],
                    parameters=[device_param],
                ),
            ),
        ]

    async def enrol(self, request: web.Request) -> web.Response:
        try:
            body = EnrolRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return _bad_body(exc)
        async with self._lock:
            try:
                now = self._clock_ms()
                await self._store.check_enrolment(body.token, body.device_id, now)
                _check_csr_key(body.csr_pem)
                try:
                    # the CA reads its files: not on the event loop
                    csr = body.csr_pem.encode()
                    cert = await asyncio.to_thread(self._signer.sign, csr, body.device_id)
                except ValueError as exc:  # provisioning's CsrRejected, InvalidName
                    raise CsrRefused(str(exc)) from None
                key = _ed25519_key(cert)
                serial = f"{cert.serial_number:X}"
                pending = await self._store.complete_enrolment(
                    body.token, key, serial, self._clock_ms()
                )
            except EnrolmentError as exc:
                log.warning("enrol: refused %s: %s", body.device_id, exc.reason)
                return _error(exc)
        if self._refresh is not None:
            await self._refresh(body.device_id)
        log.info(
            "enrol: %s %s, certificate %s",
            body.device_id,
            "rotated" if pending.rotate else "enrolled",
            serial,
        )
        info = self._info
        return web.json_response(
            {
                "device_id": body.device_id,
                "kind": pending.kind,
                "district": pending.district,
                "rotated": pending.rotate,
                "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                "serial": serial,
                "ca_pem": info.ca_pem,
                "gateway_id": info.gateway_id,
                "gateway_public_key": info.gateway_public_key,
                "broker": {"host": info.broker_host, "port": info.broker_port},
                "release_public_key": info.release_public_key,
            }
        )

    async def renew(self, request: web.Request) -> web.Response:
        """A new certificate for a device's current key, before its old one expires."""
        try:
            response = await self._renewed(RenewRequest.model_validate_json(await request.read()))
        except ValidationError as exc:
            response = _bad_body(exc)
        if response.status != 200 and self._metrics is not None:
            self._metrics.api_refused.labels("renewal").inc()
        return response

    async def _renewed(self, body: RenewRequest) -> web.Response:
        device = self._device(body.device_id) if self._device is not None else None
        if device is None or device.revoked:
            log.warning("renew: refused %s: unknown or revoked", body.device_id)
            why = "revoked" if device is not None else "not enrolled"
            return _error(RenewalRefused(f"device {body.device_id} is {why}: enrol it again"))
        registered = public_key_from_b64(device.public_key)
        try:
            check_renew_request(body, lambda _kid: registered, self._clock_ms(), RENEW_WINDOW_MS)
            _check_csr_key(body.csr_pem)
            csr_key = x509.load_pem_x509_csr(body.csr_pem.encode()).public_key()
            if (
                not isinstance(csr_key, Ed25519PublicKey)
                or public_key_to_b64(csr_key) != device.public_key
            ):
                raise CsrRefused("a renewal keeps the device's key: a new key is a rotation")
        except ProtocolError as exc:
            log.warning("renew: refused %s: %s", body.device_id, exc.reason)
            return _error(RenewalRefused(f"the renewal's proof is refused ({exc.reason})"))
        except ValueError as exc:  # an unreadable CSR, or CsrRefused
            log.warning("renew: refused %s: %s", body.device_id, exc)
            return _error(exc if isinstance(exc, CsrRefused) else CsrRefused(str(exc)))
        try:
            cert = await asyncio.to_thread(
                self._signer.renew, body.csr_pem.encode(), body.device_id
            )
        except RenewalRefused as exc:
            log.warning("renew: refused %s: no unrevoked certificate", body.device_id)
            return _error(exc)
        except ValueError as exc:
            return _error(CsrRefused(str(exc)))
        serial = f"{cert.serial_number:X}"
        log.info("renew: %s renewed, certificate %s", body.device_id, serial)
        return web.json_response(
            {
                "device_id": body.device_id,
                "cert_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                "serial": serial,
                "not_after_ms": int(cert.not_valid_after_utc.timestamp() * 1000),
            }
        )

    async def create(self, request: web.Request) -> web.Response:
        try:
            new = NewEnrolment.model_validate_json(await request.read())
        except ValidationError as exc:
            return _bad_body(exc)
        if not new.rotate:
            try:
                check_district(new.district)
            except UnknownDistrict as exc:
                return web.json_response({"error": str(exc), "reason": "district"}, status=400)
        try:
            token, pending = await self._store.issue_enrolment(
                new.device_id,
                new.kind,
                new.district,
                new.label,
                now_ms=self._clock_ms(),
                ttl_s=new.ttl_s,
                rotate=new.rotate,
                serves=request[TOKEN_KEY].sees,
            )
        except EnrolmentError as exc:
            return _error(exc)
        log.info("enrol: token issued for %s (rotate=%s)", new.device_id, new.rotate)
        return web.json_response(
            {**_record_json(pending, self._clock_ms()), "token": token}, status=201
        )

    async def records(self, request: web.Request) -> web.Response:
        device_id = request.query.get("device_id")
        records = await self._store.enrolments(device_id)
        now = self._clock_ms()
        token = request[TOKEN_KEY]  # only its districts' records
        listed = [_record_json(r, now) for r in records if token.sees(r.district)]
        return web.json_response({"enrolments": listed})

    async def cancel(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        count = await self._store.cancel_enrolments(device_id, self._clock_ms())
        return web.json_response({"device_id": device_id, "cancelled": count})


def _record_json(pending: Pending, now_ms: int) -> dict[str, Any]:
    return {**asdict(pending), "state": pending.state(now_ms)}


def attach(
    api: Api,
    registry: Registry,
    store: EnrolmentStore,
    site_dir: Path,
    *,
    metrics: Metrics | None = None,
    clock_ms: Callable[[], int] | None = None,
) -> Enrolment:
    """Add the enrolment routes to a gateway's API, signing with the CA in `site_dir`.

    The gateway service calls this before it serves, when its config names a site; the
    tokens go into `store`, the gateway's own, beside the devices they register.
    """
    enrolment = Enrolment(
        store,
        SiteSigner(site_dir),
        EnrolmentInfo.from_site(site_dir),
        refresh=registry.refresh,
        device=registry.device,
        metrics=metrics,
        clock_ms=clock_ms,
    )
    api.add_routes(enrolment.routes())
    return enrolment


def attach_if_site(
    api: Api,
    registry: Registry,
    store: EnrolmentStore,
    config: GatewayConfig,
    metrics: Metrics | None = None,
) -> Enrolment | None:
    """The gateway service's hook: serve enrolment when `[enrol] site_dir` names a site
    and the API is on. Its CA key must be readable by the gateway's user (see the
    module docstring for what that costs); when it is not, enrolment stays off and says why,
    and the gateway runs on."""
    site_dir = config.enrol.site_dir
    if site_dir is None or not config.api.enabled:
        return None
    from siteca.errors import ProvisioningError
    from siteca.site import Site

    try:
        Site.open(site_dir).ca()
    except (ProvisioningError, OSError) as exc:
        log.warning("enrol: off, the site CA cannot be used: %s", exc)
        return None
    if config.api.cert_file is None:
        log.warning(
            "enrol: the API has no api.cert_file: devices enrol only over HTTPS, so none can "
            "enrol until it has one"
        )
    enrolment = attach(api, registry, store, site_dir, metrics=metrics)
    log.info("enrol: POST /enrol on, signing with the CA of %s", site_dir)
    return enrolment
