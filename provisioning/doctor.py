"""`ansimi provision doctor`: a site checked end to end, as a checklist.

Each check is one line, passed or failed, and a failed one says what to do. It reads the
site and the gateway.toml init-site wrote (as TOML: provisioning does not load the
gateway's own config), and only looks: it dials the broker with the gateway's TLS identity,
asks the API's /healthz, and opens a connection to each centre without sending an event.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ansimi.jsonhttp import NOTHING_LISTENS, Unreachable, request_json
from siteca import pki
from siteca.errors import ProvisioningError
from siteca.site import DIAGNOSTIC_PREFIX, Site

# a certificate ending sooner than this is reported: time to renew before devices fail
EXPIRY_WARNING: Final = dt.timedelta(days=30)
DIAL_TIMEOUT_S: Final = 3.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_site(
    root: Path, *, now: dt.datetime | None = None, timeout_s: float = DIAL_TIMEOUT_S
) -> list[Check]:
    """Every check of the site at `root`; an unreadable site is one failed check."""
    try:
        site = Site.open(root)
    except ProvisioningError as exc:
        return [Check("site", False, str(exc))]
    config = _gateway_config(site)
    checks = [Check("site", True, f"{site.info.name} at {site.layout.root}")]
    checks += _certificates(site, now or dt.datetime.now(dt.UTC))
    checks += _file_modes(site, config)
    checks.append(_broker(site, timeout_s))
    checks.append(_api(site, config, timeout_s))
    checks += _centres(config, timeout_s)
    return checks


def _gateway_config(site: Site) -> dict[str, Any]:
    try:
        return tomllib.loads(site.layout.gateway_config.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProvisioningError(
            f"cannot read {site.layout.gateway_config} ({exc}): restore it, or rebuild the "
            "site with init-site --force"
        ) from None


def _certificates(site: Site, now: dt.datetime) -> list[Check]:
    layout = site.layout
    renew = {
        layout.api_cert: f"ansimi provision api-cert --dir {layout.root}",
    }
    rebuild = f"ansimi provision init-site --dir {layout.root} --force (every device re-enrols)"
    checks = []
    ca = pki.read_cert(layout.ca_cert)
    for path in (layout.ca_cert, layout.gateway_cert, layout.broker.cert_file, layout.api_cert):
        name = f"certificate {path.relative_to(layout.root)}"
        try:
            cert = pki.read_cert(path)
            if path != layout.ca_cert:
                pki.verify_issued_by(ca, cert)
        except (ProvisioningError, OSError) as exc:
            checks.append(Check(name, False, f"{exc}: {renew.get(path, rebuild)}"))
            continue
        end = cert.not_valid_after_utc
        if now < cert.not_valid_before_utc or now >= end:
            checks.append(Check(name, False, f"not valid now: {renew.get(path, rebuild)}"))
        elif end - now < EXPIRY_WARNING:
            checks.append(
                Check(name, False, f"expires {end:%Y-%m-%d}: renew now, {renew.get(path, rebuild)}")
            )
        else:
            checks.append(Check(name, True, f"valid until {end:%Y-%m-%d}"))
    return checks


def _file_modes(site: Site, config: dict[str, Any]) -> list[Check]:
    layout = site.layout
    secrets = [layout.ca_key, layout.gateway_key, layout.gateway_tls_key, layout.gateway_config]
    secrets += [Path(t["token_file"]) for t in config.get("api", {}).get("tokens", [])]
    secrets += [Path(p) for p in (config.get("api", {}).get("key_file"),) if p]
    secrets += [Path(p) for p in (config.get("privacy", {}).get("key_file"),) if p]
    # the broker's key is 0640 for group mosquitto: others only must not read it
    group_ok = {layout.broker.key_file}
    wrong = []
    for path in [*dict.fromkeys(secrets), *group_ok]:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError as exc:
            wrong.append(f"{path}: {exc.strerror}")
            continue
        allowed = 0o640 if path in group_ok else 0o600
        if mode & ~allowed:
            wrong.append(f"{path} is {mode:04o}: chmod {allowed:o} {path}")
    if wrong:
        return [Check("file modes", False, "; ".join(wrong))]
    return [Check("file modes", True, "keys, tokens and the data key readable by owner only")]


def _broker(site: Site, timeout_s: float) -> Check:
    """A TLS handshake with the gateway's client certificate: the broker's certificate, the
    CA, and the broker's acceptance of a site identity, all at once."""
    host, port = site.local_broker_address()
    layout = site.layout
    context = ssl.create_default_context(cafile=str(layout.ca_cert))
    context.load_cert_chain(layout.gateway_cert, layout.gateway_tls_key)
    name = f"broker {host}:{port} (mutual TLS)"
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # TLS 1.3 sends the broker's verdict on our certificate after the handshake:
            # an MQTT answer (or a reset) shows it. The CONNECT names a protocol level no
            # broker speaks, so it is refused before any session: a real CONNECT with this
            # identity would take over the gateway's client id (use_username_as_clientid)
            # and knock the running gateway off
            tls.sendall(_MQTT_PROBE)
            answer = tls.recv(4)
    except ConnectionRefusedError as exc:
        return Check(name, False, f"{exc}: start it with `mosquitto -c {layout.broker_conf}`")
    except (OSError, ssl.SSLError) as exc:
        # something answered, but not with this site's certificate or not over TLS
        return Check(name, False, _not_ours(host, port, f"{exc}", layout.broker_conf))
    if answer[:1] != b"\x20":
        return Check(name, False, _not_ours(host, port, "no MQTT answer", layout.broker_conf))
    if answer[3:4] != _UNACCEPTABLE_VERSION:
        why = f"unexpected CONNACK {answer.hex()}"
        return Check(name, False, _not_ours(host, port, why, layout.broker_conf))
    return Check(name, True, "TLS both ways, and the broker answers MQTT")


def _not_ours(host: str, port: int, why: str, broker_conf: Path) -> str:
    """A port the site's broker should have, held by another program (or an old broker)."""
    return (
        f"something listens on {host}:{port} but is not this site's broker ({why}): "
        f"`ss -ltnp 'sport = :{port}'` names it; stop it, then start the site's with "
        f"`mosquitto -c {broker_conf}` (it keeps this port: enrolled devices use it)"
    )


# an MQTT CONNECT at protocol level 0x7F (none), which the broker answers with CONNACK
# "unacceptable protocol version" (1) and a close; the client id is a reserved diagnostic one
_PROBE_ID: Final = (DIAGNOSTIC_PREFIX + "doctor").encode()
_MQTT_PROBE: Final = bytes(
    [0x10, 12 + len(_PROBE_ID), 0, 4, *b"MQTT", 0x7F, 0x02, 0, 5, 0, len(_PROBE_ID), *_PROBE_ID]
)
_UNACCEPTABLE_VERSION: Final = b"\x01"


def _api(site: Site, config: dict[str, Any], timeout_s: float) -> Check:
    api = config.get("api", {})
    if not api.get("enabled"):
        return Check("gateway API", False, f"[api] is off in {site.layout.gateway_config}")
    url = f"https://127.0.0.1:{api.get('port', site.info.api_port)}/healthz"
    context = ssl.create_default_context(cafile=str(site.layout.ca_cert))
    try:
        answer = request_json("GET", url, context=context, timeout_s=timeout_s)
    except Unreachable as exc:
        start = f"start it with `ansimi gateway run --config {site.layout.gateway_config}`"
        if exc.fix == NOTHING_LISTENS:
            return Check(f"gateway API {url}", False, f"{exc}: {start}")
        # something answered, but not with this site's certificate, or not over HTTPS
        port = urllib.parse.urlsplit(url).port
        return Check(
            f"gateway API {url}",
            False,
            f"something listens on port {port} but is not this site's gateway API ({exc.reason}):"
            f" `ss -ltnp 'sport = :{port}'` names it; stop it and {start}, or move the API"
            f" ([api] port in {site.layout.gateway_config})",
        )
    state = answer.body.get("status", "?")
    failing = ", ".join(map(str, answer.body.get("failing", [])))
    detail = f"/healthz says {state} (HTTP {answer.status})" + (
        f", failing: {failing}" if failing else ""
    )
    if answer.status != 200:
        detail += ": its log says why (`journalctl -u ansimi-gateway`)"
    return Check(f"gateway API {url}", answer.status == 200, detail)


def _centres(config: dict[str, Any], timeout_s: float) -> list[Check]:
    places: list[tuple[str, str, int]] = []
    for centre in config.get("centres", []):
        parsed = urllib.parse.urlsplit(str(centre.get("url", "")))
        default = 443 if parsed.scheme == "https" else 80
        places.append(
            (f"centre {centre.get('name')}", parsed.hostname or "", parsed.port or default)
        )
    for receiver in config.get("sia", []):
        places.append((f"receiver {receiver.get('name')}", receiver["host"], int(receiver["port"])))
    checks = []
    for name, host, port in places:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                pass
        except OSError as exc:
            checks.append(
                Check(
                    name,
                    False,
                    f"cannot connect to {host}:{port} ({exc}): alerts wait in the outbox until "
                    "it answers; check the centre, or its URL in gateway.toml",
                )
            )
        else:
            checks.append(Check(name, True, f"{host}:{port} accepts connections"))
    return checks
