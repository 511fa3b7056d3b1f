"""Device identities, seen from the installer's laptop: add, list, show, revoke, rotate, check.

The gateway keeps the devices and their one-time enrolment tokens (gateway/enrol.py); the
site directory keeps the CA, every certificate it signed and the broker's CRL and ACL. Each
operation here touches both, in the order that leaves nothing half-done:

- `add` checks everything it can locally (district, id, where the QR label goes) before it
  asks the gateway for a token, and cancels the token again if the label cannot be written.
- `revoke` cancels unused tokens, revokes at the gateway (messages refused at once), then
  at the broker (CRL, ACL, reload, live session closed). Each step is idempotent, so a run
  cut short is finished by running it again.
- `rotate` has a new key made on the device (a re-enrolment with a rotation token); the old
  certificates are revoked only once the gateway has heard from the device with the new one.
"""

from __future__ import annotations

import datetime as dt
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import segno

from ansimi.districts import UnknownDistrict, check_district
from protocol.clock import wall_ms
from protocol.ids import check_id
from protocol.messages import DeviceKind
from provisioning.gateway_admin import AdminClient
from provisioning.identity import DeviceIdentityLoader
from provisioning.label import label_lines, label_png, label_svg
from provisioning.revoke import (
    BrokerControl,
    RevokeResult,
    revoke_certificate,
    throwaway_context,
)
from siteca import pki
from siteca.errors import BrokerControlError, InvalidName, ProvisioningError
from siteca.files import write_atomic
from siteca.site import Site, serial_text

Kind = DeviceKind
DEFAULT_TTL_S: Final = 24 * 3600


class DistrictError(ProvisioningError, ValueError):
    pass


class LabelError(ProvisioningError, OSError):
    pass


class RotationIncomplete(ProvisioningError, RuntimeError):
    pass


class PartialRevocation(ProvisioningError, RuntimeError):
    """Revoked at the gateway, not (yet) at the broker: running the command again finishes."""


def check_new_id(device_id: str) -> str:
    try:
        return check_id(device_id, "device id")
    except ValueError as exc:
        raise InvalidName(f"{exc}: use 3-64 of a-z, 0-9 and '-'") from None


def checked_district(name: str) -> str:
    try:
        return check_district(name.strip().lower())
    except UnknownDistrict as exc:
        raise DistrictError(f"{exc} (one of Seoul's 25 district codes)") from None


def default_id(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(3)}"


def enrol_url(gateway: str, token: str) -> str:
    # the token rides in the fragment: browsers and proxies never send a fragment anywhere,
    # so a scanned label opened by mistake does not put the token in some access log
    return f"{gateway.rstrip('/')}/enrol#token={token}"


def device_command(gateway: str, *, ca: bool) -> str:
    """What the installer runs on the device (the token goes on stdin or after --token)."""
    line = f"ansimi device enrol --gateway {gateway.rstrip('/')} --token <token>"
    return line + (" --ca-file ca.crt" if ca else "")


# ---- add -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Added:
    device_id: str
    kind: str
    district: str
    label: str
    token: str
    expires_ms: int
    url: str
    qr_png: Path
    qr_svg: Path


def _labels(qr_dir: Path, device_id: str) -> tuple[Path, Path]:
    return qr_dir / f"{device_id}.png", qr_dir / f"{device_id}.svg"


def add_device(
    client: AdminClient,
    kind: Kind,
    district: str,
    label: str,
    *,
    device_id: str | None,
    qr_dir: Path,
    ttl_s: int = DEFAULT_TTL_S,
    force_label: bool = False,
) -> Added:
    district = checked_district(district)
    device_id = check_new_id(device_id or default_id(kind))
    png, svg = _labels(qr_dir, device_id)
    if not qr_dir.is_dir():
        raise LabelError(f"{qr_dir} is not a directory: create it, or pass --qr-dir")
    existing = [p for p in (png, svg) if p.exists()]
    if existing and not force_label:
        raise LabelError(
            f"{existing[0]} exists already (an earlier label for {device_id}?): remove it, "
            "or pass --force-label"
        )
    # prove the directory is writable before a token exists that would need cancelling
    with tempfile.NamedTemporaryFile(dir=qr_dir, prefix=".probe-"):
        pass

    record = client.create_enrolment(device_id, kind, district, label, ttl_s=ttl_s)
    token = str(record["token"])
    url = enrol_url(client.base_url, token)
    try:
        code = segno.make(url, error="m")
        # under the code, what the installer reads: which device, what it is, where
        lines = label_lines(device_id, kind, district)
        for path, data in ((png, label_png(code, lines)), (svg, label_svg(code, lines))):
            # the label is the token: readable by the installer only
            write_atomic(path, data, mode=0o600)
    except BaseException:
        client.cancel_enrolments(device_id)
        for path in (png, svg):
            path.unlink(missing_ok=True)
        raise
    return Added(device_id, kind, district, label, token, int(record["expires_ms"]), url, png, svg)


# ---- list and show -------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    device_id: str
    kind: str
    district: str
    label: str
    state: str  # pending, expired, cancelled, enrolled, revoked
    online: bool | None = None
    last_seen_ms: int | None = None
    enrolments: list[dict[str, Any]] = field(default_factory=list)
    certificates: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.device_id,
            "kind": self.kind,
            "district": self.district,
            "label": self.label,
            "state": self.state,
            "online": self.online,
            "last_seen_ms": self.last_seen_ms,
            "enrolments": self.enrolments,
            "certificates": self.certificates,
        }


def _view(
    device_id: str, records: list[dict[str, Any]], registered: dict[str, Any] | None
) -> DeviceView:
    newest = records[0] if records else {}
    if registered is not None:
        state = "revoked" if registered.get("revoked") else "enrolled"
        source = registered
    else:
        state = str(newest.get("state", "unknown"))
        source = newest
    return DeviceView(
        device_id,
        str(source.get("kind", "")),
        str(source.get("district", "")),
        str(source.get("label", "")),
        state,
        registered.get("online") if registered else None,
        registered.get("last_seen_ms") if registered else None,
        records,
    )


def list_devices(client: AdminClient) -> list[DeviceView]:
    by_device: dict[str, list[dict[str, Any]]] = {}
    for record in client.enrolments():
        by_device.setdefault(str(record["device_id"]), []).append(record)
    return [_view(d, records, client.device(d)) for d, records in sorted(by_device.items())]


def certificates(site: Site, device_id: str) -> list[dict[str, Any]]:
    revoked = {r.serial for r in site.revocations().revoked}
    return [
        {
            "serial": serial_text(c.serial_number),
            "not_before": c.not_valid_before_utc.isoformat(),
            "not_after": c.not_valid_after_utc.isoformat(),
            "revoked": c.serial_number in revoked,
        }
        for c in sorted(site.issued(), key=lambda c: c.not_valid_before_utc)
        if pki.common_name(c) == device_id
    ]


def show_device(client: AdminClient, device_id: str, site: Site | None) -> DeviceView | None:
    records = client.enrolments(device_id)
    registered = client.device(device_id)
    if not records and registered is None:
        return None
    view = _view(device_id, records, registered)
    if site is not None:
        view = DeviceView(**{**view.__dict__, "certificates": certificates(site, device_id)})
    return view


# ---- revoke --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Revoked:
    device_id: str
    tokens_cancelled: int
    at_gateway: bool  # False: the gateway never had it (it never enrolled)
    broker: RevokeResult | None  # None: the CA never issued it a certificate

    @property
    def complete(self) -> bool:
        return self.broker is None or self.broker.complete


def revoke_device(
    client: AdminClient,
    site_dir: Path,
    device_id: str,
    *,
    broker: BrokerControl | None,
    broker_address: tuple[str, int] | None = None,
    reason: str = "",
) -> Revoked:
    site = Site.open(site_dir)  # a missing site stops us before anything changes
    pki.check_identity(device_id, "device id")
    cancelled = client.cancel_enrolments(device_id)
    at_gateway = client.revoke_device(device_id)
    if not any(pki.common_name(c) == device_id for c in site.issued()):
        return Revoked(device_id, cancelled, at_gateway, None)
    try:
        result = revoke_certificate(
            site.layout.root,
            f"cn:{device_id}",
            broker=broker,
            broker_address=broker_address,
            reason=reason or "revoked by `ansimi provision device revoke`",
        )
    except BrokerControlError as exc:
        # the gateway already refuses it, and the CRL and ACL are written: say what is left
        raise PartialRevocation(
            f"{device_id} is revoked at the gateway (its messages are refused) and its "
            f"certificate is on the CRL, but the broker was not reloaded: {exc}. Fix that and "
            "run this command again"
        ) from None
    return Revoked(device_id, cancelled, at_gateway, result)


# ---- decommission --------------------------------------------------------------------------


@dataclass(frozen=True)
class Decommissioned:
    revoked: Revoked
    wiped_at_gateway: bool  # its personal data and label gone; False: the gateway never had it


def decommission_device(
    client: AdminClient,
    site_dir: Path,
    device_id: str,
    *,
    broker: BrokerControl | None,
    broker_address: tuple[str, int] | None = None,
) -> Decommissioned:
    """Revoke everywhere (as `revoke`), then wipe the personal data the gateway holds.

    The events stay at the gateway under the bare device id: the anonymised history.
    """
    revoked = revoke_device(
        client,
        site_dir,
        device_id,
        broker=broker,
        broker_address=broker_address,
        reason="decommissioned",
    )
    return Decommissioned(revoked, client.decommission_device(device_id))


# ---- rotate --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    device_id: str
    token: str
    expires_ms: int
    url: str


def start_rotation(client: AdminClient, device_id: str, *, ttl_s: int) -> Rotation:
    pki.check_identity(device_id, "device id")
    record = client.create_enrolment(device_id, "bell", "", "", ttl_s=ttl_s, rotate=True)
    token = str(record["token"])
    return Rotation(device_id, token, int(record["expires_ms"]), enrol_url(client.base_url, token))


@dataclass(frozen=True)
class Finished:
    device_id: str
    new_serial: str
    revoked: list[str]
    broker: RevokeResult | None


def finish_rotation(
    client: AdminClient,
    site_dir: Path,
    device_id: str,
    *,
    broker: BrokerControl | None,
    broker_address: tuple[str, int] | None = None,
    wait_s: float = 60.0,
    clock_ms: Callable[[], int] = wall_ms,
    sleep: Callable[[float], None] = time.sleep,
) -> Finished:
    """Once the gateway has heard from the device since its rotation, revoke its older
    certificates (never the newest: that is the one the device now uses)."""
    site = Site.open(site_dir)
    used = [r for r in client.enrolments(device_id) if r.get("rotate") and r.get("used_ms")]
    if not used:
        raise RotationIncomplete(
            f"{device_id} has not re-enrolled with a rotation token yet: run "
            "`ansimi device enrol --force` on it with the token from `rotate`"
        )
    newest = max(used, key=lambda r: int(r["used_ms"]))
    new_serial = str(newest["serial"])
    deadline = time.monotonic() + wait_s
    while True:
        device = client.device(device_id) or {}
        if int(device.get("last_seen_ms") or 0) > int(newest["used_ms"]):
            break
        if time.monotonic() >= deadline:
            raise RotationIncomplete(
                f"the gateway has not heard from {device_id} since its new key: restart its "
                "agent (`systemctl restart ansimi-device`) and run `rotate --finish` again. "
                "Its old certificate stays valid until then"
            )
        sleep(0.5)
    old = [
        c["serial"]
        for c in certificates(site, device_id)
        if c["serial"] != new_serial and not c["revoked"]
    ]
    result = None
    for serial in old:
        result = revoke_certificate(
            site.layout.root,
            f"serial:{serial}",
            broker=broker,
            broker_address=broker_address,
            # the device is connected with its new certificate under the same CN: leave it
            kick=False,
            reason=f"rotated to {new_serial}",
        )
    return Finished(device_id, new_serial, old, result)


def run_remote_enrol(argv: Sequence[str], feed: str, timeout_s: float = 300.0) -> int:
    """Run `argv` (ssh) with `feed` on its stdin; what it prints goes to our stderr, so that
    our own stdout stays one JSON document under --json."""
    done = subprocess.run(
        list(argv), input=feed.encode(), stdout=sys.stderr, check=False, timeout=timeout_s
    )
    return done.returncode


# ---- check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checked (nothing to check it with)
    detail: str


def _mqtt_connect(
    host: str,
    port: int,
    context: ssl.SSLContext,
    client_id: str,
    timeout_s: float,
    *,
    keep_session: bool = True,
) -> str:
    """Connect and disconnect; "" if the broker accepted us, else why not.

    As a device, MQTT 3.1.1 with clean_session=False (`keep_session`): the broker names
    every client by its certificate CN, so this connection takes over the device's own
    session for a moment. A persistent session survives that (its queued messages are
    kept); the agent reconnects by itself.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

    outcome: list[Any] = []
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=not keep_session,
        reconnect_on_failure=False,
    )
    client.tls_set_context(context)
    client.on_connect = lambda c, u, f, reason, p: outcome.append(reason)
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not outcome and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError) as exc:
        return f"cannot connect to {host}:{port}: {exc}"
    finally:
        if outcome:
            client.disconnect()
            client.loop(timeout=0.1)
    if not outcome:
        return f"{host}:{port} closed the connection or did not answer (refused certificate?)"
    if outcome[0].is_failure:
        return f"{host}:{port} refused: {outcome[0]}"
    return ""


def _when(ms: int) -> str:
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.UTC):%Y-%m-%d %H:%M:%S} UTC"


def probe_broker(site: Site, host: str, port: int, timeout_s: float = 5.0) -> str:
    """Connect with a throwaway two-minute certificate for a random `check-...` id, which
    no device has (so nobody's session is touched) and the ACL grants nothing that matters;
    held in memory only. "" if the broker accepted it, else why not."""
    cn = f"check-{secrets.token_hex(4)}"
    context = throwaway_context(site, cn, dt.timedelta(minutes=2))
    return _mqtt_connect(host, port, context, cn, timeout_s, keep_session=False)


def check_device(
    client: AdminClient,
    device_id: str,
    *,
    site: Site | None,
    device_config: Path | None,
    load_identity: DeviceIdentityLoader | None = None,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    timeout_s: float = 5.0,
) -> list[Check]:
    """`load_identity` reads `device_config` (the composition hands the device's own config
    loader in: provisioning does not import the device)."""
    from ansimi.config import ConfigError
    from protocol.keys import load_private_key, public_key_to_b64

    checks: list[Check] = []
    try:
        health = client.health()
    except ProvisioningError as exc:
        checks.append(Check("gateway reachable", False, str(exc)))
        return checks
    skew = health.clock_skew_s(now())
    checks.append(Check("gateway reachable", True, f"{client.base_url} (HTTP {health.status})"))
    checks.append(
        Check(
            "clock",
            None if skew is None else abs(skew) <= 120,
            "no Date header" if skew is None else f"this clock is {skew:+.0f} s from the gateway's",
        )
    )
    registered = client.device(device_id)
    if registered is None:
        records = client.enrolments(device_id)
        state = records[0]["state"] if records else "unknown"
        checks.append(Check("registered at gateway", False, f"not enrolled (enrolment: {state})"))
    else:
        revoked = bool(registered.get("revoked"))
        checks.append(
            Check("registered at gateway", not revoked, "REVOKED" if revoked else "enrolled")
        )
        seen = registered.get("last_seen_ms")
        checks.append(
            Check(
                "heard from",
                registered.get("online") is True,
                "never"
                if seen is None
                else f"last {_when(seen)}, "
                + ("online" if registered.get("online") else "offline"),
            )
        )
    if site is not None:
        certs = certificates(site, device_id)
        valid = [c for c in certs if not c["revoked"]]
        checks.append(
            Check(
                "certificate at the site CA",
                bool(valid),
                f"{len(valid)} valid of {len(certs)} issued"
                + (f", newest {valid[-1]['serial']}" if valid else ""),
            )
        )
        host, port = site.local_broker_address()
        problem = probe_broker(site, host, port, timeout_s)
        checks.append(
            Check("broker TLS", not problem, problem or f"{host}:{port} trusted and answering")
        )
    if device_config is None:
        checks.append(
            Check("connect as the device", None, "pass --device-config on the device to try")
        )
        return checks
    if load_identity is None:
        checks.append(Check("device config", False, "run through `ansimi provision`"))
        return checks
    try:
        identity = load_identity(device_config)
    except ConfigError as exc:
        checks.append(Check("device config", False, str(exc)))
        return checks
    key_ok = False
    try:
        key = load_private_key(identity.key_file)
        mine = public_key_to_b64(key.public_key())
        expected = (registered or {}).get("public_key")
        key_ok = expected == mine
        checks.append(
            Check(
                "device key",
                key_ok,
                "matches the gateway's record" if key_ok else "differs from the gateway's record",
            )
        )
    except (ValueError, OSError) as exc:
        checks.append(Check("device key", False, str(exc)))
    if identity.ca_file is None or identity.cert_file is None:
        checks.append(Check("connect as the device", False, "no mqtt.ca_file/cert_file"))
        return checks
    try:
        context = ssl.create_default_context(cafile=str(identity.ca_file))
        context.load_cert_chain(str(identity.cert_file), str(identity.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        checks.append(Check("connect as the device", False, f"its TLS files: {exc}"))
        return checks
    host, port = identity.broker
    problem = _mqtt_connect(host, port, context, identity.device_id, timeout_s)
    checks.append(
        Check("connect as the device", not problem, problem or f"accepted by {host}:{port}")
    )
    return checks
