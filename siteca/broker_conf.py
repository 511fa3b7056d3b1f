"""The broker's side of a site: its ACL file and its mosquitto configuration.

Identity comes from the client certificate only. With `use_identity_as_username` mosquitto
takes the certificate's CN as the username, and every ACL line here keys on it (`%u`). The
client id (`%c`) is chosen by the client, so a device could claim another's: it appears in
no rule, and `use_username_as_clientid` replaces it with the CN so that one device cannot
knock another off the broker by connecting under its client id.

Facts this relies on, checked against mosquitto 2.0.11 (tests/integration/provisioning):
- A subscribe is always granted by the ACL file (also under v5); what a client may *read* is
  checked per message, against the message's topic, when it is delivered. So a
  `$share/<group>/ansimi/v1/+/up/#` subscription needs no rule of its own: the gateway's
  `topic read ansimi/v1/+/up/#` covers what it delivers.
- A user's own lines are checked before the patterns, and `deny` lines first of all, so a
  `user <id>` block with `topic deny #` shuts a revoked identity out of every pattern.
- SIGHUP re-reads the ACL file (also for clients already connected) and the CRL (for new
  connections only; a live TLS session is never re-verified).
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ansimi.broker import BrokerTls, MosquittoConfig
from protocol.ids import DEVICE_ID_RE
from protocol.topics import MAX_PACKET_BYTES
from siteca.pki import check_identity

TOPIC_ROOT: Final = "ansimi/v1"
DEVICE_WRITE: Final = f"{TOPIC_ROOT}/%u/up/#"
DEVICE_READ: Final = f"{TOPIC_ROOT}/%u/down/#"
GATEWAY_READ: Final = f"{TOPIC_ROOT}/+/up/#"
GATEWAY_WRITE: Final = f"{TOPIC_ROOT}/+/down/#"
DEFAULT_PORT: Final = 8883


def diagnostic_filter(device_id: str | None) -> str:
    """What a diagnostic identity may read: every device's up topics, or all of one device's
    traffic (its up and down topics)."""
    if device_id is None:
        return GATEWAY_READ
    return f"{TOPIC_ROOT}/{check_identity(device_id, 'device id')}/#"


def render_acl(
    gateway_ids: Sequence[str],
    revoked_ids: Iterable[str] = (),
    diagnostics: Mapping[str, str] | None = None,
) -> str:
    """The ACL file for a site: device patterns, one block per gateway, one per installer's
    diagnostic identity (`diagnostics`: identity -> the topic filter it reads), one per
    revoked id.

    A revoked gateway keeps its block, but with a deny instead of its grants; a revoked
    diagnostic identity is simply a revoked id.
    """
    gateways = [check_identity(g, "gateway id") for g in gateway_ids]
    revoked = sorted({check_identity(r, "revoked id") for r in revoked_ids})
    lines = [
        "# written by `ansimi provision`; edit the generator, not this file.",
        "# Identity is the client certificate's CN (use_identity_as_username), so rules key on",
        "# %u. The client id is chosen by the client and must never grant anything.",
        "",
        "# Every device: write only its own up topics, read only its own down topics.",
        f"pattern write {DEVICE_WRITE}",
        f"pattern read {DEVICE_READ}",
    ]
    for gateway in gateways:
        lines += ["", f"user {gateway}"]
        if gateway in revoked:
            lines += ["# revoked", "topic deny #"]
            continue
        lines += [
            "# reads every device's up topics, also through $share/<group>/... subscriptions",
            "# (mosquitto checks the topic of each delivered message, not the filter)",
            f"topic read {GATEWAY_READ}",
            f"topic write {GATEWAY_WRITE}",
            "# its intake probe (protocol/probe.py), heard back through the read above",
            f"topic write {TOPIC_ROOT}/{gateway}/up/probe",
        ]
    for identity, readable in sorted((diagnostics or {}).items()):
        identity = check_identity(identity, "diagnostic id")
        if identity in revoked or not _is_filter_of_site(readable):
            continue  # its deny block follows with the revoked ids
        lines += [
            "",
            f"user {identity}",
            "# an installer's read-only diagnostic identity: reads, never publishes. The deny",
            "# line shuts it out of the device patterns above (its own up/down topics).",
            f"topic deny {TOPIC_ROOT}/{identity}/#",
            f"topic read {readable}",
        ]
    devices = [r for r in revoked if r not in gateways]
    if devices:
        lines += [
            "",
            "# Revoked identities: a user's deny lines are checked before any pattern, so these",
            "# clients can neither publish nor receive, even on a connection still open.",
        ]
        for identity in devices:
            lines += [f"user {identity}", "topic deny #"]
    return "\n".join(lines) + "\n"


def _is_filter_of_site(readable: str) -> bool:
    # only the two shapes `diagnostic_filter` makes: nothing may smuggle a write or a '#'
    # at the root into the file
    parts = readable.split("/")
    return readable == GATEWAY_READ or (
        len(parts) == 4
        and "/".join(parts[:2]) == TOPIC_ROOT
        and DEVICE_ID_RE.fullmatch(parts[2]) is not None
        and parts[3] == "#"
    )


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where a site keeps what the broker reads."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    acl_file: Path
    data_dir: Path


def broker_config(
    files: BrokerFiles,
    *,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    state_dir: Path | None = None,
    run_as: str | None = None,
) -> MosquittoConfig:
    """The mosquitto configuration of a site's broker (`MosquittoConfig.render()` writes it).

    `run_as` becomes mosquitto's `user` option: started as root, mosquitto otherwise drops
    to user `mosquitto`, which must then be able to read the files (see `files.broker_owners`).
    Tests pass their own user name so that a broker started by root stays root and can read
    a site under a private temporary directory.
    """
    extra = [
        "# A client's id is replaced by its certificate CN: no device can take over another's",
        "# session, or disconnect it, by connecting with the other's client id.",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
        "# Sessions of devices that never come back are dropped after a month.",
        "persistent_client_expiration 30d",
        "# No message bigger than the gateway reads (protocol/topics.py MAX_PACKET_BYTES): a",
        "# 10 MB payload is dropped here, with its sender's connection, not carried onward.",
        f"max_packet_size {MAX_PACKET_BYTES}",
    ]
    return MosquittoConfig(
        # spelled out, so that ansimi.broker's keep-the-caller's-user default does not apply
        user=run_as or "mosquitto",
        state_dir=state_dir if state_dir is not None else files.data_dir,
        port=port,
        host=host,
        tls=BrokerTls(
            ca_file=files.ca_file,
            cert_file=files.cert_file,
            key_file=files.key_file,
            require_certificate=True,
            use_identity_as_username=True,
            crl_file=files.crl_file,
        ),
        acl_file=files.acl_file,
        allow_anonymous=False,
        persistence=True,
        extra_lines=extra,
    )


def current_user() -> str:
    """The user to pass as `run_as` when a test or a demo starts the broker itself."""
    return getpass.getuser()
