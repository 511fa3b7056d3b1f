"""Installers' read-only diagnostic identities for `mosquitto_sub`.

An installer who watches a site's traffic with a device's own certificate knocks that
bell off the broker: `use_username_as_clientid` gives the watcher the device's client id,
so the broker drops the device's session (and the centres see it go offline and come
back). A diagnostic identity is a certificate of its own, `diag-<name>`, a CN no device can
have (the site refuses device ids starting `diag-`), so its client id never clashes with a
device's. Its ACL block reads every device's up topics (or all of one device's topics) and
denies everything else: it never publishes. It is short-lived (7 days by default) and
revoked like any identity (`ansimi provision revoke diag-<name>`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from provisioning.revoke import BrokerControl, fully_revoked_identities
from siteca import pki
from siteca.broker_conf import diagnostic_filter, render_acl
from siteca.files import broker_owners, write_atomic
from siteca.site import DIAGNOSTIC_PREFIX, DIAGNOSTICS_FILE, Site

DIAGNOSTIC_DAYS = 7


@dataclass(frozen=True, slots=True)
class DiagnosticIdentity:
    identity: str
    reads: str  # the topic filter its ACL block lets it read
    ca_file: Path
    cert_file: Path
    key_file: Path
    serial: int
    not_after: dt.datetime
    reloaded: bool


def issue_diagnostic(
    site_dir: Path,
    name: str,
    out_dir: Path,
    *,
    device_id: str | None = None,
    days: int = DIAGNOSTIC_DAYS,
    broker: BrokerControl | None = None,
    now: dt.datetime | None = None,
) -> DiagnosticIdentity:
    """Issue `diag-<name>` into `out_dir`, grant it reading in the ACL, reload the broker."""
    site = Site.open(site_dir)
    identity = pki.check_identity(DIAGNOSTIC_PREFIX + name, "diagnostic id (diag-<name>)")
    reads = diagnostic_filter(device_id)
    key = pki.generate_key()
    with site.lock():
        cert = pki.issue_client_cert(site.ca(), identity, key.public_key(), days, now=now)
        site.record_issued(cert)
        grants = {**site.diagnostics(), identity: reads}
        owners = broker_owners()
        owner = owners[0] if owners else None
        write_atomic(site.layout.root / DIAGNOSTICS_FILE, json.dumps(grants, indent=2).encode())
        revoked = {r.serial for r in site.revocations().revoked}
        denied = fully_revoked_identities(site.issued(), revoked)
        acl = render_acl([site.gateway_id], denied, grants)
        write_atomic(site.layout.broker.acl_file, acl.encode(), owner=owner)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)  # a private key goes in
    key_file, cert_file = out_dir / f"{identity}.key", out_dir / f"{identity}.crt"
    pki.write_private_key(key_file, key)
    pki.write_cert(cert_file, cert)
    ca_file = out_dir / "site-ca.crt"
    ca_file.write_bytes(site.layout.ca_cert.read_bytes())
    if broker is not None:
        broker.reload()
    return DiagnosticIdentity(
        identity,
        reads,
        ca_file,
        cert_file,
        key_file,
        cert.serial_number,
        cert.not_valid_after_utc,
        broker is not None,
    )
