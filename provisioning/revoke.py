"""Revoking a certificate, and making the broker act on it at once.

What mosquitto 2.0.11 does, found by testing (tests/integration/provisioning) and by reading
its `mosquitto_security_apply_default`:

- SIGHUP re-reads the CRL, so the revoked certificate is refused at its next TLS handshake.
  A connection already open is NOT re-verified: it stays up, publishing and receiving.
- SIGHUP also re-reads the ACL and re-attaches `user` blocks to live connections, so a
  `user <cn>` / `topic deny #` block silences a connected client at once (it can neither
  publish nor receive), but does not disconnect it either.
- Nothing in 2.0.11 disconnects a client on request (no admin kick outside plugins). What
  does: with `use_username_as_clientid` every client id is its certificate CN, and a new
  connection with the same client id takes the session over, closing the old connection.
  So we connect once as the revoked CN, with a throwaway certificate valid for two minutes,
  and leave with a clean session. The revoked client, reconnecting, meets the new CRL.
- Reloading is dangerous with unreadable files: mosquitto 2.0.11, unable to open its ACL on
  SIGHUP, keeps running with NO ACL and lets every client publish and read anything; with
  a CRL or server key it cannot load, it keeps running but strips the `user` grants (the
  gateway's) from every live connection. So before every reload we check, as the broker's
  own uid and groups, that it can read every file it will re-read, and refuse otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import signal
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import paho.mqtt.client as paho
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from siteca import pki
from siteca.broker_conf import render_acl
from siteca.errors import BrokerControlError, InvalidName, UnknownCertificate
from siteca.files import broker_owners, write_atomic
from siteca.site import Revocation, RevocationList, Site, serial_text

# time for mosquitto to act on SIGHUP before we rely on it (it does so within milliseconds)
SETTLE_S: Final = 0.5
KICK_CERT_LIFETIME: Final = dt.timedelta(minutes=2)
_SERIAL_RE: Final = re.compile(r"(0[xX])?[0-9A-Fa-f:]{1,64}")


class BrokerControl(Protocol):
    """How revocation reaches the running broker."""

    def main_pid(self) -> int:
        """The broker's process id; raises BrokerControlError if it is not running."""
        ...

    def reload(self) -> None:
        """Make the broker re-read its ACL and CRL (SIGHUP)."""
        ...


@dataclass(frozen=True, slots=True)
class SignalBroker:
    """A broker known by process id: a child we started, or one with a pid file."""

    pid: int

    @classmethod
    def from_pid_file(cls, path: Path) -> SignalBroker:
        try:
            return cls(int(path.read_text().strip()))
        except (OSError, ValueError) as exc:
            raise BrokerControlError(f"cannot read a process id from {path}: {exc}") from None

    def main_pid(self) -> int:
        if not _alive(self.pid):
            raise BrokerControlError(
                f"no broker running as process {self.pid}: the new CRL and ACL are written "
                "and apply when it starts"
            )
        return self.pid

    def reload(self) -> None:
        os.kill(self.main_pid(), signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class SystemdBroker:
    """The broker as a systemd service (Debian's unit reloads with SIGHUP)."""

    unit: str = "mosquitto"

    def main_pid(self) -> int:
        out = self._systemctl("show", "--property", "MainPID", "--value", self.unit)
        pid = int(out.strip() or 0)
        if pid == 0:
            raise BrokerControlError(
                f"systemd unit {self.unit} is not running: start it (`systemctl start "
                f"{self.unit}`); the new CRL and ACL are in place and apply from its start"
            )
        return pid

    def reload(self) -> None:
        self._systemctl("reload", self.unit)

    def _systemctl(self, *args: str) -> str:
        try:
            done = subprocess.run(
                ["systemctl", *args], capture_output=True, text=True, check=True, timeout=30
            )
        except FileNotFoundError:
            raise BrokerControlError(
                "systemctl not found: pass --pid-file for a broker not run by systemd, "
                "or --no-reload and send it SIGHUP yourself"
            ) from None
        except subprocess.CalledProcessError as exc:
            raise BrokerControlError(
                f"`systemctl {' '.join(args)}` failed: {exc.stderr.strip() or exc}"
            ) from None
        return done.stdout


@dataclass(frozen=True)
class RevokeResult:
    revoked: list[Revocation]
    already_revoked: list[Revocation]
    # identities with no unrevoked certificate left: denied everything in the ACL
    denied_identities: list[str]
    crl_number: int
    reloaded: bool = False
    kicked: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.reloaded and not self.warnings


def revoke_certificate(
    site_dir: Path | str,
    serial_or_cn: int | str,
    *,
    broker: BrokerControl | None = None,
    kick: bool = True,
    broker_address: tuple[str, int] | None = None,
    reason: str = "",
    now: dt.datetime | None = None,
    settle_s: float = SETTLE_S,
    kick_timeout_s: float = 5.0,
) -> RevokeResult:
    """Revoke one certificate (by serial) or every certificate of an identity (by CN).

    Writes the CRL and ACL; with a `broker`, reloads it and then disconnects any client
    still connected under the revoked identity. Running it again for the same target
    revokes nothing new but reloads and disconnects again, so a run that could not reach
    the broker can simply be repeated.
    """
    site = Site.open(site_dir)
    moment = now if now is not None else dt.datetime.now(dt.UTC)
    with site.lock():
        issued = site.issued()
        targets = _resolve(serial_or_cn, issued)
        state = site.revocations()
        known = {r.serial: r for r in state.revoked}
        new = [
            Revocation(
                serial=c.serial_number,
                common_name=pki.common_name(c),
                revoked_at=moment,
                reason=reason,
            )
            for c in targets
            if c.serial_number not in known
        ]
        old = [known[c.serial_number] for c in targets if c.serial_number in known]
        # every rewrite of the CRL gets a new number, as RFC 5280 asks
        state = RevocationList(crl_number=state.crl_number + 1, revoked=(*state.revoked, *new))
        write_atomic(
            site.layout.revocations_file, state.model_dump_json(indent=2).encode(), mode=0o600
        )
        denied = fully_revoked_identities(issued, {r.serial for r in state.revoked})
        _write_broker_files(site, state, denied, moment)

    result = RevokeResult(
        revoked=new, already_revoked=old, denied_identities=denied, crl_number=state.crl_number
    )
    if broker is None:
        result.warnings.append(
            "the broker was not reloaded: until it is (`systemctl reload mosquitto`, or "
            "SIGHUP), it still accepts the revoked certificate"
        )
        return result
    pid = broker.main_pid()
    check_broker_can_read(pid, _broker_read_paths(site))
    broker.reload()
    time.sleep(settle_s)
    if not _alive(pid):
        raise BrokerControlError(f"the broker (process {pid}) exited after reload: see its log")
    result = dataclasses.replace(result, reloaded=True)
    if kick:
        host, port = broker_address or site.local_broker_address()
        for cn in sorted({pki.common_name(c) for c in targets}):
            try:
                kick_identity(site, cn, host, port, timeout_s=kick_timeout_s)
            except BrokerControlError as exc:
                result.warnings.append(str(exc))
            else:
                result.kicked.append(cn)
    return result


def _resolve(target: int | str, issued: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    if isinstance(target, int):
        return _by_serial(target, issued)
    text = target.strip()
    if text.startswith("serial:"):
        return _by_serial(_parse_serial(text[len("serial:") :]), issued)
    if text.startswith("cn:"):
        return _by_cn(text[len("cn:") :], issued)
    by_cn = [c for c in issued if pki.common_name(c) == text]
    serial = _parse_serial(text) if _SERIAL_RE.fullmatch(text) else None
    by_serial = [c for c in issued if c.serial_number == serial]
    if by_cn and by_serial:
        raise UnknownCertificate(
            f"{text!r} is both an identity and a serial number here: write cn:{text} or "
            f"serial:{text}"
        )
    if by_cn or by_serial:
        return by_cn or by_serial
    raise UnknownCertificate(
        f"this site's CA issued no certificate with common name or serial {text!r}: "
        "check the id (serials are hex, as `openssl x509 -noout -serial` prints them)"
    )


def _parse_serial(text: str) -> int:
    cleaned = text.strip().removeprefix("0x").removeprefix("0X").replace(":", "")
    try:
        return int(cleaned, 16)
    except ValueError:
        raise InvalidName(f"serial {text!r} is not hexadecimal") from None


def _by_serial(serial: int, issued: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    found = [c for c in issued if c.serial_number == serial]
    if not found:
        raise UnknownCertificate(f"this site's CA issued no certificate {serial_text(serial)}")
    return found


def _by_cn(cn: str, issued: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    pki.check_identity(cn)
    found = [c for c in issued if pki.common_name(c) == cn]
    if not found:
        raise UnknownCertificate(f"this site's CA issued no certificate for {cn!r}")
    return found


def fully_revoked_identities(issued: Iterable[x509.Certificate], revoked: set[int]) -> list[str]:
    """Identities all of whose certificates are revoked (one with a newer valid certificate,
    re-enrolled after a revocation by serial, keeps its grants)."""
    alive: set[str] = set()
    seen: set[str] = set()
    for cert in issued:
        cn = pki.common_name(cert)
        seen.add(cn)
        if cert.serial_number not in revoked:
            alive.add(cn)
    return sorted(seen - alive)


def _write_broker_files(
    site: Site, state: RevocationList, denied: list[str], now: dt.datetime
) -> None:
    owners = broker_owners()
    owner = owners[0] if owners else None
    ca = site.ca()
    crl = pki.build_crl(
        ca, {r.serial: r.revoked_at for r in state.revoked}, crl_number=state.crl_number, now=now
    )
    files = site.layout.broker
    write_atomic(files.crl_file, pki.crl_to_pem(crl), owner=owner)
    acl = render_acl([site.gateway_id], denied, site.diagnostics())  # installers' grants stay
    write_atomic(files.acl_file, acl.encode(), owner=owner)
    # a CRL the broker cannot load costs the gateway its grants on reload: read it back
    written = pki.read_crl(files.crl_file)
    if not written.is_signature_valid(ca.key.public_key()):
        raise BrokerControlError(f"{files.crl_file} does not verify with the site CA")


def _broker_read_paths(site: Site) -> list[Path]:
    f = site.layout.broker
    return [f.ca_file, f.cert_file, f.key_file, f.crl_file, f.acl_file, site.layout.broker_conf]


# ---- the broker process ---------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state letter follows the command name, which is in parentheses and may hold spaces
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@dataclass(frozen=True, slots=True)
class _Credentials:
    uid: int
    gids: frozenset[int]


def _credentials(pid: int) -> _Credentials:
    uid = gid = -1
    groups: set[int] = set()
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise BrokerControlError(f"cannot inspect the broker process {pid}: {exc}") from None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        # the fourth id is the filesystem id, the one the kernel checks on open()
        if key == "Uid":
            uid = int(fields[3])
        elif key == "Gid":
            gid = int(fields[3])
        elif key == "Groups":
            groups.update(int(g) for g in fields)
    return _Credentials(uid, frozenset({gid, *groups}))


def _permits(info: os.stat_result, who: _Credentials, owner: int, group: int, other: int) -> bool:
    # POSIX: the owner class applies alone when the owner matches, then group, then other
    if info.st_uid == who.uid:
        return bool(info.st_mode & owner)
    if info.st_gid in who.gids:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)


def check_broker_can_read(pid: int, paths: Iterable[Path]) -> None:
    """Refuse to reload a broker that could not read every file it re-reads on SIGHUP."""
    who = _credentials(pid)
    if who.uid == 0:
        return
    problems: list[str] = []
    for path in paths:
        path = path.absolute()
        for parent in reversed(path.parents):
            if not _permits(parent.stat(), who, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                problems.append(f"cannot enter {parent}")
                break
        else:
            if not _permits(path.stat(), who, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
                problems.append(f"cannot read {path}")
    if problems:
        raise BrokerControlError(
            f"not reloading the broker (process {pid}, uid {who.uid}): it "
            + "; ".join(dict.fromkeys(problems))
            + ". Reloaded like this, mosquitto 2.0.11 would run without its ACL (letting every "
            "client publish anywhere) or drop the gateway's grants. Fix the ownership (as root: "
            "root:mosquitto, 0640 files, 0750 directories), then run this command again"
        )


# ---- disconnecting a live client ------------------------------------------------------------


def throwaway_context(site: Site, cn: str, lifetime: dt.timedelta) -> ssl.SSLContext:
    """A TLS client context for identity `cn` with a short-lived certificate that exists only
    in memory (and, for the instant ssl needs it, in a private temporary directory)."""
    key = pki.generate_key(site.info.key_type)
    cert = pki.issue_client_cert(site.ca(), cn, key.public_key(), lifetime=lifetime)
    context = ssl.create_default_context(cafile=str(site.layout.ca_cert))
    with tempfile.TemporaryDirectory(prefix="ansimi-tls-") as tmp:
        key_file, cert_file = Path(tmp) / "client.key", Path(tmp) / "client.crt"
        write_atomic(key_file, pki.key_to_pem(key), mode=0o600)
        write_atomic(cert_file, pki.cert_to_pem(cert), mode=0o600)
        context.load_cert_chain(str(cert_file), str(key_file))
    return context


def kick_identity(site: Site, cn: str, host: str, port: int, *, timeout_s: float = 5.0) -> None:
    """Close any live connection of identity `cn` by taking its session over.

    Needs `use_username_as_clientid` (our broker config sets it): the broker then knows every
    connection by its CN, and a second connection as `cn` closes the first. We connect with
    a two-minute certificate for `cn` that exists only in memory (and, for the instant ssl
    needs it, in a private temporary directory), start a clean session so the revoked
    client's queued messages go too, and leave.
    """
    context = throwaway_context(site, cn, KICK_CERT_LIFETIME)
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"revoke-{cn}",
        protocol=paho.MQTTv5,
        reconnect_on_failure=False,
    )
    client.tls_set_context(context)
    outcome: list[ReasonCode] = []

    def on_connect(c: paho.Client, u: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        outcome.append(reason)

    client.on_connect = on_connect
    where = f"the broker at {host}:{port}"
    failed = (
        f"could not disconnect {cn!r}: {{}}. Its certificate is revoked and the broker "
        "reloaded, so it cannot connect again; to drop a connection still open, restart the "
        "broker (`systemctl restart mosquitto`)"
    )
    try:
        client.connect(host, port, keepalive=10, clean_start=True)
        deadline = time.monotonic() + timeout_s
        while not outcome and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError) as exc:
        raise BrokerControlError(failed.format(f"{where} is unreachable ({exc})")) from None
    try:
        if not outcome:
            raise BrokerControlError(failed.format(f"{where} did not answer"))
        if outcome[0].is_failure:
            raise BrokerControlError(failed.format(f"{where} refused us ({outcome[0]})"))
    finally:
        client.disconnect()
        client.loop(timeout=0.1)
