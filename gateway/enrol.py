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
- **The token and the device row change in one transaction.** The token table lives in the
  gateway's own SQLite database, and completing an enrolment marks the token used and
  inserts (or, for a rotation, re-keys) the device row in the same transaction: a crash
  leaves either a used token and a registered device, or neither. This writes the store's
  `devices` table directly (only its insert and its key column); a PostgreSQL store will
  need the same two statements.
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
import hashlib
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ansimi.districts import UnknownDistrict, check_district
from gateway.api import TOKEN_KEY, Api, ApiRoute
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.intake import Registry
from gateway.store import DeviceKind, transaction
from protocol.ids import DeviceId
from protocol.keys import public_key_to_b64

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 24 * 3600
MAX_TTL_S: Final = 14 * 24 * 3600
MAX_CSR_BYTES: Final = 8 * 1024

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS enrolments (
    token_hash   TEXT PRIMARY KEY,      -- SHA-256 of the token, hex; never the token itself
    device_id    TEXT NOT NULL,
    kind         TEXT NOT NULL,
    district     TEXT NOT NULL,
    label        TEXT NOT NULL DEFAULT '',
    rotate       INTEGER NOT NULL DEFAULT 0,  -- 1: a new key for a device already enrolled
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER NOT NULL,
    used_ms      INTEGER,
    cancelled_ms INTEGER,
    serial       TEXT                   -- the certificate it was traded for (hex)
);
CREATE INDEX IF NOT EXISTS enrolments_by_device ON enrolments(device_id, created_ms);
"""

Refusal = Literal["unknown", "expired", "used", "cancelled", "wrong-device", "revoked"]

# what an installer (or the device's CLI, which shows it) can do about each refusal
_REFUSALS: Final[dict[str, str]] = {
    "unknown": "this enrolment token is not known here: check it was copied whole, and that "
    "this is the gateway that issued it",
    "expired": "this enrolment token has expired: ask for a new one "
    "(`ansimi provision device add`, or `rotate` for an enrolled device)",
    "used": "this enrolment token was used already: each token enrols once; ask for a new one",
    "cancelled": "this enrolment token was cancelled: ask for a new one",
    "wrong-device": "this enrolment token is for another device id: check the id on the label",
    "revoked": "this device is revoked: it cannot be enrolled again under the same id",
}


class EnrolmentError(GatewayError):
    """Root of this module's refusals; `status` is the HTTP status that carries it."""

    status = 400

    def __init__(self, message: str, reason: str = "bad-request") -> None:
        super().__init__(message)
        self.reason = reason


class TokenRefused(EnrolmentError, PermissionError):
    status = 403

    def __init__(self, reason: Refusal) -> None:
        super().__init__(_REFUSALS[reason], reason)


class DuplicateEnrolment(EnrolmentError, ValueError):
    status = 409

    def __init__(self, device_id: str, why: str) -> None:
        super().__init__(f"device {device_id} {why}: choose another --id", "duplicate")


class NotEnrolled(EnrolmentError, LookupError):
    status = 404

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"device {device_id} is not enrolled: `rotate` needs an enrolled device; "
            "use `ansimi provision device add` for a new one",
            "not-enrolled",
        )


class OtherDistrict(EnrolmentError, PermissionError):
    status = 403

    def __init__(self, district: str) -> None:
        super().__init__(f"district {district} is not one of this token's", "district")


class CsrRefused(EnrolmentError, ValueError):
    status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message, "csr")


@dataclass(frozen=True, slots=True)
class Pending:
    """One enrolment record (a token's metadata; never the token)."""

    device_id: str
    kind: DeviceKind
    district: str
    label: str
    rotate: bool
    created_ms: int
    expires_ms: int
    used_ms: int | None
    cancelled_ms: int | None
    serial: str | None

    def state(self, now_ms: int) -> Literal["pending", "used", "cancelled", "expired"]:
        if self.used_ms is not None:
            return "used"
        if self.cancelled_ms is not None:
            return "cancelled"
        return "pending" if now_ms < self.expires_ms else "expired"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def new_token(device_id: str) -> str:
    """`<device id>.<256 random bits>`: the device learns its id from the token (and the QR
    label) alone, so the installer types nothing else on the device."""
    return f"{device_id}.{secrets.token_urlsafe(32)}"


def token_device(token: str) -> str:
    """The device id a token names (its part before the first dot)."""
    return token.partition(".")[0]


class EnrolmentStore:
    """The `enrolments` table, in the gateway's SQLite database (its own connection)."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        # the gateway's store may be committing a batch: wait for it rather than fail
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    _COLUMNS = (
        "device_id, kind, district, label, rotate, created_ms, expires_ms, used_ms,"
        " cancelled_ms, serial"
    )

    @staticmethod
    def _pending(row: tuple[Any, ...]) -> Pending:
        d, kind, district, label, rotate, created, expires, used, cancelled, serial = row
        return Pending(
            str(d),
            kind,
            str(district),
            str(label),
            bool(rotate),
            int(created),
            int(expires),
            used,
            cancelled,
            serial,
        )

    @staticmethod
    def _device_row(db: sqlite3.Connection, device_id: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = db.execute(
            "SELECT device_id, kind, district, label, revoked FROM devices WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return row

    def issue(
        self,
        device_id: str,
        kind: DeviceKind,
        district: str,
        label: str,
        *,
        now_ms: int,
        ttl_s: int = DEFAULT_TTL_S,
        rotate: bool = False,
        serves: Callable[[str], bool] = lambda _district: True,
    ) -> tuple[str, Pending]:
        """A new token for `device_id`; a new device's id must be free, a rotated one
        enrolled and not revoked. A rotation keeps the device's kind, district and label.
        `serves`: whether the asking token serves a district (ApiToken.sees)."""
        token = new_token(device_id)
        with self._tx() as db:
            row = self._device_row(db, device_id)
            live = db.execute(
                "SELECT 1 FROM enrolments WHERE device_id = ? AND used_ms IS NULL"
                " AND cancelled_ms IS NULL AND expires_ms > ?",
                (device_id, now_ms),
            ).fetchone()
            if rotate:
                # another district's device is answered as an unknown one
                if row is None or not serves(row[2]):
                    raise NotEnrolled(device_id)
                if row[4]:
                    raise TokenRefused("revoked")
                kind, district, label = row[1], row[2], row[3]
                # a fresh rotation token replaces one not yet used
                db.execute(
                    "UPDATE enrolments SET cancelled_ms = ? WHERE device_id = ?"
                    " AND used_ms IS NULL AND cancelled_ms IS NULL",
                    (now_ms, device_id),
                )
            elif not serves(district):
                raise OtherDistrict(district)
            elif row is not None:
                raise DuplicateEnrolment(device_id, "is already registered")
            elif live is not None:
                raise DuplicateEnrolment(
                    device_id,
                    "already has an enrolment waiting (cancel it with "
                    "`ansimi provision device revoke`, or let it expire)",
                )
            db.execute(
                "INSERT INTO enrolments (token_hash, device_id, kind, district, label, rotate,"
                " created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    hash_token(token),
                    device_id,
                    kind,
                    district,
                    label,
                    int(rotate),
                    now_ms,
                    now_ms + ttl_s * 1000,
                ),
            )
        pending = Pending(
            device_id,
            kind,
            district,
            label,
            rotate,
            now_ms,
            now_ms + ttl_s * 1000,
            None,
            None,
            None,
        )
        return token, pending

    def check(self, token: str, device_id: str, now_ms: int) -> Pending:
        """The enrolment `token` opens for `device_id`, or TokenRefused saying why not."""
        rows = self._query(
            f"SELECT {self._COLUMNS} FROM enrolments WHERE token_hash = ?",  # noqa: S608
            (hash_token(token),),
        )
        if not rows:
            raise TokenRefused("unknown")
        pending = self._pending(rows[0])
        if pending.device_id != device_id:
            raise TokenRefused("wrong-device")
        state = pending.state(now_ms)
        if state != "pending":
            raise TokenRefused(state)
        return pending

    def complete(self, token: str, public_key_b64: str, serial: str, now_ms: int) -> Pending:
        """Mark the token used and register (or re-key) its device, in one transaction."""
        with self._tx() as db:
            row = db.execute(
                f"SELECT {self._COLUMNS} FROM enrolments WHERE token_hash = ?",  # noqa: S608
                (hash_token(token),),
            ).fetchone()
            if row is None:
                raise TokenRefused("unknown")
            pending = self._pending(row)
            state = pending.state(now_ms)
            if state != "pending":  # another request got there first, or time ran out
                raise TokenRefused(state)
            db.execute(
                "UPDATE enrolments SET used_ms = ?, serial = ? WHERE token_hash = ?",
                (now_ms, serial, hash_token(token)),
            )
            device = self._device_row(db, pending.device_id)
            if pending.rotate:
                if device is None:
                    raise NotEnrolled(pending.device_id)
                if device[4]:
                    raise TokenRefused("revoked")
                db.execute(
                    "UPDATE devices SET public_key = ? WHERE device_id = ?",
                    (public_key_b64, pending.device_id),
                )
            else:
                if device is not None:
                    raise DuplicateEnrolment(pending.device_id, "is already registered")
                db.execute(
                    "INSERT INTO devices (device_id, public_key, kind, district, label,"
                    " revoked, created_ms) VALUES (?, ?, ?, ?, ?, 0, ?)",
                    (
                        pending.device_id,
                        public_key_b64,
                        pending.kind,
                        pending.district,
                        pending.label,
                        now_ms,
                    ),
                )
        return pending

    def cancel(self, device_id: str, now_ms: int) -> int:
        """Cancel every unused token of `device_id`; how many there were."""
        with self._tx() as db:
            return db.execute(
                "UPDATE enrolments SET cancelled_ms = ? WHERE device_id = ? AND used_ms IS NULL"
                " AND cancelled_ms IS NULL",
                (now_ms, device_id),
            ).rowcount

    def records(self, device_id: str | None = None) -> list[Pending]:
        """Enrolment records, newest first (all devices, or one)."""
        rows = self._query(
            f"SELECT {self._COLUMNS} FROM enrolments"  # noqa: S608
            " WHERE (? IS NULL OR device_id = ?) ORDER BY created_ms DESC, rowid DESC",
            (device_id, device_id),
        )
        return [self._pending(r) for r in rows]

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


# ---- signing -------------------------------------------------------------------------------


class CsrSigner(Protocol):
    """Has the site CA sign a device's CSR, for exactly `device_id`."""

    def sign(self, csr_pem: bytes, device_id: str) -> x509.Certificate: ...


@dataclass(frozen=True, slots=True)
class SiteSigner:
    """Signs with the CA of a site directory (`ansimi provision init-site`) and records
    the certificate there, so `ansimi provision device revoke` finds it."""

    site_dir: Path

    def sign(self, csr_pem: bytes, device_id: str) -> x509.Certificate:
        from siteca.site import Site

        return Site.open(self.site_dir).sign_csr(csr_pem, device_id)


@dataclass(frozen=True, slots=True)
class EnrolmentInfo:
    """What every enrolled device is told besides its own certificate."""

    gateway_id: str
    gateway_public_key: str  # raw Ed25519, base64url
    broker_host: str
    broker_port: int
    ca_pem: str

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
        refresh: Callable[[str], None] = lambda _device_id: None,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        self._store = store
        self._signer = signer
        self._info = info
        # the gateway's registry caches devices: told when one is added or re-keyed
        self._refresh = refresh
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
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

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        # SQLite waits for the intake's fsync, the CA reads files: not on the event loop
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def enrol(self, request: web.Request) -> web.Response:
        try:
            body = EnrolRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            return _bad_body(exc)
        async with self._lock:
            try:
                now = self._clock_ms()
                await self._run(self._store.check, body.token, body.device_id, now)
                _check_csr_key(body.csr_pem)
                try:
                    cert = await self._run(self._signer.sign, body.csr_pem.encode(), body.device_id)
                except ValueError as exc:  # provisioning's CsrRejected, InvalidName
                    raise CsrRefused(str(exc)) from None
                key = _ed25519_key(cert)
                serial = f"{cert.serial_number:X}"
                pending = await self._run(
                    self._store.complete, body.token, key, serial, self._clock_ms()
                )
            except EnrolmentError as exc:
                log.warning("enrol: refused %s: %s", body.device_id, exc.reason)
                return _error(exc)
        self._refresh(body.device_id)
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
            token, pending = await self._run(
                lambda: self._store.issue(
                    new.device_id,
                    new.kind,
                    new.district,
                    new.label,
                    now_ms=self._clock_ms(),
                    ttl_s=new.ttl_s,
                    rotate=new.rotate,
                    serves=request[TOKEN_KEY].sees,
                )
            )
        except EnrolmentError as exc:
            return _error(exc)
        log.info("enrol: token issued for %s (rotate=%s)", new.device_id, new.rotate)
        return web.json_response(
            {**_record_json(pending, self._clock_ms()), "token": token}, status=201
        )

    async def records(self, request: web.Request) -> web.Response:
        device_id = request.query.get("device_id")
        records = await self._run(self._store.records, device_id)
        now = self._clock_ms()
        token = request[TOKEN_KEY]  # only its districts' records
        listed = [_record_json(r, now) for r in records if token.sees(r.district)]
        return web.json_response({"enrolments": listed})

    async def cancel(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        count = await self._run(self._store.cancel, device_id, self._clock_ms())
        return web.json_response({"device_id": device_id, "cancelled": count})


def _record_json(pending: Pending, now_ms: int) -> dict[str, Any]:
    return {**asdict(pending), "state": pending.state(now_ms)}


def attach(
    api: Api,
    registry: Registry,
    database: Path,
    site_dir: Path,
    *,
    clock_ms: Callable[[], int] | None = None,
) -> Enrolment:
    """Add the enrolment routes to a gateway's API, signing with the CA in `site_dir`.

    The gateway service calls this before it serves, when its config names a site; the
    token table goes into the gateway's own database (opened after its store, whose
    `devices` table it writes).
    """
    enrolment = Enrolment(
        EnrolmentStore(database),
        SiteSigner(site_dir),
        EnrolmentInfo.from_site(site_dir),
        refresh=registry.refresh,
        clock_ms=clock_ms,
    )
    api.add_routes(enrolment.routes())
    return enrolment


def attach_if_site(api: Api, registry: Registry, config: GatewayConfig) -> Enrolment | None:
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
    enrolment = attach(api, registry, config.database, site_dir)
    log.info("enrol: POST /enrol on, signing with the CA of %s", site_dir)
    return enrolment
