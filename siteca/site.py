"""A site on disk: its CA, its gateway's identity and its broker's files, made all at once.

`init_site` builds the whole site in a temporary directory beside the target and renames it
into place, so an interrupted run leaves either no site or a complete one, never half of one.
Running it again changes nothing; replacing a site (a new CA, which invalidates every device
certificate) takes --force.

    DIR/site.json                 what the site is (name, gateway id, broker address)
    DIR/ca/ca.key, ca.crt         the site CA (key 0600)
    DIR/ca/issued/<SERIAL>.pem    every certificate the CA signed: what revocation looks up
    DIR/ca/revocations.json       what was revoked, when and why; the CRL is built from it
    DIR/gateway/gateway.key, .pub the gateway's Ed25519 signing key (acks) and its public half
    DIR/gateway/mqtt.crt, .key    the gateway's TLS client identity (CN = gateway id)
    DIR/gateway/api.crt, .key     the operator API's HTTPS certificate (`provision api-cert`)
    DIR/gateway/tokens/*.token    the API's bearer tokens: admin, and the central operator's
    DIR/gateway/privacy.key       the data key sealing personal data (out of the db's backup)
    DIR/state/                    the gateway's database and recordings (--system: /var/lib)
    DIR/broker/...                server cert and key, ca.crt, crl.pem, acl, mosquitto.conf,
                                  data/ (persistence): everything mosquitto reads
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import shutil
import tempfile
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ansimi.broker import MosquittoConfig
from ansimi.privacy import create_key_file
from ansimi.tomlwrite import render_toml
from protocol.keys import generate_key as generate_signing_key
from protocol.keys import public_key_to_b64, save_private_key
from siteca import pki
from siteca.broker_conf import DEFAULT_PORT, BrokerFiles, broker_config, render_acl
from siteca.errors import InvalidName, ProvisioningError, SiteExists, SiteNotFound
from siteca.files import Owner, broker_owners, fsync_dir, locked, make_dir, write_atomic

SITE_FILE: Final = "site.json"
GATEWAY_PREFIX: Final = "gw-"
# installers' read-only diagnostic identities (provisioning/diagnostic.py); no device may
# be named so, so a diagnostic client id never equals a device's and never knocks it off
DIAGNOSTIC_PREFIX: Final = "diag-"
DIAGNOSTICS_FILE: Final = "diagnostics.json"
# the operator API: on loopback by default, where the installer's CLI on this machine finds it
API_PORT: Final = 8480
ADMIN_TOKEN_HOLDER: Final = "admin"  # noqa: S105 - a holder's name, not a secret
CENTRAL_TOKEN_HOLDER: Final = "central"  # noqa: S105
# where a system-wide install keeps the gateway's database and recordings (systemd's
# StateDirectory in systemd/ansimi-gateway.service)
SYSTEM_STATE_DIR: Final = Path("/var/lib/ansimi/gateway")
_SLUG_RE: Final = re.compile(r"[^a-z0-9-]+")


class SiteInfo(BaseModel):
    """What `site.json` says about a site."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    name: str
    gateway_id: str
    key_type: pki.KeyType = "ed25519"
    # names and addresses devices dial; all are in the broker's certificate
    broker_names: tuple[str, ...] = ()
    listen_host: str = "0.0.0.0"
    listen_port: int = Field(default=DEFAULT_PORT, ge=1, le=65535)
    # the operator API's port on this machine (HTTPS, loopback)
    api_port: int = Field(default=API_PORT, ge=1, le=65535)
    # the gateway's database and recordings: under the site, or the system's state directory
    system_state: bool = False
    created_at: dt.datetime

    @property
    def api_url(self) -> str:
        """Where the installer's CLI on the gateway's machine reaches the operator API."""
        return f"https://127.0.0.1:{self.api_port}"

    def state_dir(self, layout: SiteLayout) -> Path:
        return SYSTEM_STATE_DIR if self.system_state else layout.state_dir


class Revocation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    serial: int
    common_name: str
    revoked_at: dt.datetime
    reason: str = ""


class RevocationList(BaseModel):
    """`ca/revocations.json`: the source the CRL is rebuilt from on every change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    crl_number: int = 1
    revoked: tuple[Revocation, ...] = ()


@dataclass(frozen=True, slots=True)
class SiteLayout:
    """Every path of a site, in one place, so no two parts spell a file name differently."""

    root: Path

    @property
    def site_file(self) -> Path:
        return self.root / SITE_FILE

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def issued_dir(self) -> Path:
        return self.ca_dir / "issued"

    @property
    def revocations_file(self) -> Path:
        return self.ca_dir / "revocations.json"

    @property
    def gateway_dir(self) -> Path:
        return self.root / "gateway"

    @property
    def gateway_key(self) -> Path:
        return self.gateway_dir / "gateway.key"

    @property
    def gateway_pub(self) -> Path:
        return self.gateway_dir / "gateway.pub"

    @property
    def gateway_cert(self) -> Path:
        return self.gateway_dir / "mqtt.crt"

    # the release key signs agent bundles (docs/fleet.md); its private half belongs on the
    # machine that builds releases, the public half is handed to devices at enrolment
    @property
    def release_key(self) -> Path:
        return self.root / "release" / "release.key"

    @property
    def release_pub(self) -> Path:
        return self.root / "release" / "release.pub"

    @property
    def gateway_tls_key(self) -> Path:
        return self.gateway_dir / "mqtt.key"

    @property
    def gateway_ca(self) -> Path:
        return self.gateway_dir / "ca.crt"

    @property
    def gateway_config(self) -> Path:
        return self.gateway_dir / "gateway.toml"

    @property
    def api_cert(self) -> Path:
        return self.gateway_dir / "api.crt"

    @property
    def api_key(self) -> Path:
        return self.gateway_dir / "api.key"

    @property
    def tokens_dir(self) -> Path:
        return self.gateway_dir / "tokens"

    def token_file(self, holder: str) -> Path:
        return self.tokens_dir / f"{holder}.token"

    @property
    def admin_token(self) -> Path:
        return self.token_file(ADMIN_TOKEN_HOLDER)

    @property
    def data_key(self) -> Path:
        return self.gateway_dir / "privacy.key"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def broker_conf(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def broker(self) -> BrokerFiles:
        d = self.broker_dir
        return BrokerFiles(
            ca_file=d / "ca.crt",
            cert_file=d / "server.crt",
            key_file=d / "server.key",
            crl_file=d / "crl.pem",
            acl_file=d / "acl",
            data_dir=d / "data",
        )

    def issued_path(self, serial: int) -> Path:
        return self.issued_dir / f"{serial:X}.pem"

    def required(self) -> list[Path]:
        b = self.broker
        return [
            self.site_file,
            self.ca_key,
            self.ca_cert,
            self.issued_dir,
            self.revocations_file,
            self.gateway_key,
            self.gateway_pub,
            self.gateway_cert,
            self.gateway_tls_key,
            self.gateway_ca,
            self.gateway_config,
            self.broker_conf,
            b.ca_file,
            b.cert_file,
            b.key_file,
            b.crl_file,
            b.acl_file,
            b.data_dir,
        ]


def serial_text(serial: int) -> str:
    """How serials are shown and typed: uppercase hex, as `openssl x509 -serial` prints them."""
    return f"{serial:X}"


class Site:
    """An initialised site directory. Open one with `Site.open(dir)`."""

    def __init__(self, layout: SiteLayout, info: SiteInfo) -> None:
        self.layout = layout
        self.info = info

    @classmethod
    def open(cls, root: Path | str) -> Site:
        layout = SiteLayout(Path(root).absolute())
        info = _read_info(layout)
        if info is None:
            raise SiteNotFound(
                f"no site at {layout.root}: run `ansimi provision init-site --dir {layout.root}`"
            )
        missing = [p for p in layout.required() if not p.exists()]
        if missing:
            raise SiteNotFound(
                f"site at {layout.root} is incomplete (missing "
                f"{', '.join(str(p.relative_to(layout.root)) for p in missing)}): restore it "
                "from a backup, or rebuild it with --force (a new CA: every device re-enrols)"
            )
        return cls(layout, info)

    @property
    def gateway_id(self) -> str:
        return self.info.gateway_id

    def ca(self) -> pki.CertAuthority:
        return pki.load_ca(self.layout.ca_key, self.layout.ca_cert)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise changes to the CA's records (issuing, revoking, replacing the site)."""
        with locked(self.layout.root.parent):
            yield

    # ---- issuing ----------------------------------------------------------------------

    def issue_client_cert(
        self,
        common_name: str,
        public_key: pki.PublicKey,
        days: int = pki.CLIENT_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Issue and record a device's TLS client certificate (CN = device id)."""
        self._refuse_reserved_name(common_name)
        with self.lock():
            cert = pki.issue_client_cert(self.ca(), common_name, public_key, days, now=now)
            self.record_issued(cert)
        return cert

    def sign_csr(
        self,
        csr_pem: bytes,
        expected_cn: str,
        days: int = pki.CLIENT_DAYS,
        *,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        self._refuse_reserved_name(expected_cn)
        with self.lock():
            cert = pki.sign_csr(self.ca(), csr_pem, expected_cn, days, now=now)
            self.record_issued(cert)
        return cert

    def _refuse_reserved_name(self, common_name: str) -> None:
        # the gateway's CN reads every device's topics, and a diagnostic identity's reads
        # them too: no device may ever be issued either
        if common_name == self.gateway_id or common_name.startswith(GATEWAY_PREFIX):
            raise InvalidName(
                f"{common_name!r} is reserved for gateways ('{GATEWAY_PREFIX}...'): "
                "choose another device id"
            )
        if common_name.startswith(DIAGNOSTIC_PREFIX):
            raise InvalidName(
                f"{common_name!r} is reserved for diagnostic identities "
                f"('{DIAGNOSTIC_PREFIX}...', `ansimi provision diagnostic`): choose another id"
            )

    def diagnostics(self) -> dict[str, str]:
        """Installers' diagnostic identities and the topic filter each may read."""
        path = self.layout.root / DIAGNOSTICS_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ProvisioningError(
                f"{path} is damaged ({exc}): restore it from a backup"
            ) from None
        return {str(k): str(v) for k, v in dict(data).items()}

    def record_issued(self, cert: x509.Certificate) -> None:
        """Keep a copy of every certificate the CA signs: revocation by CN finds them here."""
        pki.write_cert(self.layout.issued_path(cert.serial_number), cert)

    def issued(self) -> list[x509.Certificate]:
        return [pki.read_cert(p) for p in sorted(self.layout.issued_dir.glob("*.pem"))]

    def revocations(self) -> RevocationList:
        return _read_revocations(self.layout.revocations_file)

    # ---- the broker -------------------------------------------------------------------

    def broker_config(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        state_dir: Path | None = None,
        run_as: str | None = None,
    ) -> MosquittoConfig:
        """This site's mosquitto config; tests override the address, state dir and user."""
        return broker_config(
            self.layout.broker,
            host=host if host is not None else self.info.listen_host,
            port=port if port is not None else self.info.listen_port,
            state_dir=state_dir,
            run_as=run_as,
        )

    def renew_api_cert(self, *, now: dt.datetime | None = None) -> x509.Certificate:
        """A new HTTPS key and certificate for the operator API, from the site CA, in place
        of the old ones (restart the gateway to serve them)."""
        with self.lock():
            return _write_api_cert(self.layout, self.ca(), self.info, now)

    def local_broker_address(self) -> tuple[str, int]:
        """Where a tool on this machine dials the site's broker."""
        host = self.info.listen_host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.info.listen_port


def _read_info(layout: SiteLayout) -> SiteInfo | None:
    try:
        text = layout.site_file.read_text()
    except FileNotFoundError:
        return None
    try:
        return SiteInfo.model_validate_json(text)
    except ValidationError as exc:
        raise SiteNotFound(f"{layout.site_file} is not a valid site file: {exc}") from None


def _read_revocations(path: Path) -> RevocationList:
    try:
        return RevocationList.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise SiteNotFound(f"no revocation record at {path}: is this a site?") from None
    except ValidationError as exc:
        raise ProvisioningError(f"{path} is damaged: {exc}. Restore it from a backup") from None


# ---- init-site -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InitResult:
    created: bool
    site: SiteInfo
    layout: SiteLayout
    # (path, mode) of what was made, for the installer's record
    files: list[tuple[Path, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_site_name(root: Path) -> str:
    slug = _SLUG_RE.sub("-", root.name.lower()).strip("-")
    try:
        return pki.check_identity(slug, "site name")
    except InvalidName:
        raise InvalidName(
            f"cannot make a site name from the directory name {root.name!r}: pass --site NAME "
            "(3 to 61 of a-z, 0-9 and '-')"
        ) from None


def init_site(
    root: Path | str,
    *,
    site: str | None = None,
    broker_names: Sequence[str] | None = None,
    listen_host: str | None = None,
    port: int | None = None,
    key_type: pki.KeyType = "ed25519",
    force: bool = False,
    now: dt.datetime | None = None,
    centre_url: str | None = None,
    system: bool = False,
    api_port: int | None = None,
) -> InitResult:
    """Create the site at `root`, or confirm that it is already there.

    Options left as None take their defaults for a new site and are not compared with an
    existing one; options given must match the existing site unless `force` replaces it.
    `centre_url` is where the gateway's config sends every district's alerts (the central
    centre); by default the local console (`ansimi console`), so that no alert is kept for
    nobody. It is written into gateway.toml only, not compared with an existing site.
    `system` keeps the gateway's database and recordings in /var/lib/ansimi/gateway (a
    system-wide install) instead of DIR/state.
    """
    centre = check_centre_url(centre_url or LOCAL_CONSOLE_URL)
    root = Path(root).absolute()
    name = site if site is not None else default_site_name(root)
    pki.check_identity(name, "site name")
    gateway_id = pki.check_identity(GATEWAY_PREFIX + name, "gateway id (gw-<site>)")
    names = tuple(dict.fromkeys(broker_names or ()))
    root.parent.mkdir(parents=True, exist_ok=True)

    with locked(root.parent):
        existing = _existing(root)
        if existing is not None and not force:
            wanted = {
                "site": (site, existing.name),
                "broker names": (
                    names if broker_names is not None else None,
                    existing.broker_names,
                ),
                "listen address": (listen_host, existing.listen_host),
                "port": (port, existing.listen_port),
                "API port": (api_port, existing.api_port),
                "--system": (system or None, existing.system_state or None),
            }
            differs = [k for k, (new, old) in wanted.items() if new is not None and new != old]
            if differs:
                raise SiteExists(
                    f"{root} already holds site {existing.name!r}, which differs in "
                    f"{', '.join(differs)}. Pass --force to replace it: a new CA means every "
                    "device must be enrolled again"
                )
            Site.open(root)  # refuses an incomplete site, with the fix
            return InitResult(
                created=False,
                site=existing,
                layout=SiteLayout(root),
                notes=[f"site {existing.name!r} already exists at {root}"],
            )

        info = SiteInfo(
            name=name,
            gateway_id=gateway_id,
            key_type=key_type,
            broker_names=names,
            listen_host=listen_host if listen_host is not None else "0.0.0.0",
            listen_port=port if port is not None else DEFAULT_PORT,
            api_port=api_port if api_port is not None else API_PORT,
            system_state=system,
            created_at=now if now is not None else dt.datetime.now(dt.UTC),
        )
        _remove_stale_builds(root)
        build = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            files, notes = _build(SiteLayout(build), SiteLayout(root), info, now, centre)
            _move_into_place(build, root, replace=existing is not None)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    if existing is not None:
        notes.insert(0, f"replaced site {existing.name!r}: enrol every device again")
    return InitResult(created=True, site=info, layout=SiteLayout(root), files=files, notes=notes)


def _write_api_cert(
    layout: SiteLayout, ca: pki.CertAuthority, info: SiteInfo, now: dt.datetime | None
) -> x509.Certificate:
    # the names devices dial for the broker are the gateway machine's: the API answers there
    # too (enrolment), besides localhost and 127.0.0.1 for the installer's CLI
    key, cert = pki.issue_server_cert(ca, info.broker_names, key_type=info.key_type, now=now)
    pki.write_private_key(layout.api_key, key)
    pki.write_cert(layout.api_cert, cert)
    return cert


def _existing(root: Path) -> SiteInfo | None:
    if not root.exists():
        return None
    if not root.is_dir():
        raise SiteExists(f"{root} exists and is not a directory: choose another --dir")
    info = _read_info(SiteLayout(root))
    if info is None and any(root.iterdir()):
        # never replace, even with --force, a directory we did not make: it could be /etc
        raise SiteExists(
            f"{root} is not empty and holds no {SITE_FILE}: it is not a site. "
            "Choose a new or empty directory"
        )
    return info


def _remove_stale_builds(root: Path) -> None:
    """A run killed mid-build leaves its temporary directory, keys included: remove it."""
    for stale in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(build: Path, root: Path, *, replace: bool) -> None:
    if replace:
        old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(root, old)
        os.rename(build, root)
        fsync_dir(root.parent)
        shutil.rmtree(old)
    else:
        # rename(2) onto an empty directory replaces it; onto a non-empty one it fails, so
        # a concurrent run that got there first is never overwritten
        os.rename(build, root)
        fsync_dir(root.parent)


# The reference console on the gateway's machine, as the README starts it.
LOCAL_CONSOLE_URL: Final = "http://127.0.0.1:8080/events"


def check_centre_url(url: str) -> str:
    """`url` if it can be a centre's endpoint in gateway.toml, else ProvisioningError."""
    parsed = urllib.parse.urlsplit(url)
    if (
        parsed.scheme not in ("http", "https")
        or not parsed.hostname
        or any(c in url for c in '"\\')
        or not url.isprintable()
    ):
        raise ProvisioningError(
            f"centre URL {url[:80]!r} is not an http(s) URL: pass --centre-url "
            "https://HOST/PATH (the control centre's event endpoint)"
        )
    return url


def gateway_toml(site: SiteLayout, info: SiteInfo, centre_url: str, centre_secret: str) -> str:
    """A gateway config for this site: its identity, keys and broker, its state, the
    operator API on loopback with HTTPS and the site's token files, enrolment on, and one
    central centre for every district (a gateway with none refuses to start).

    Tokens are named by file, never written in here: the config can be shown or copied
    without handing out an admin's access.
    """
    host = "127.0.0.1" if info.listen_host in ("", "0.0.0.0", "::") else info.listen_host
    state = info.state_dir(site)
    config = {
        "id": info.gateway_id,
        "signing_key": site.gateway_key,
        "store": f"sqlite://{state / 'gateway.db'}",
        "mqtt": {
            "host": host,
            "port": info.listen_port,
            "ca_file": site.gateway_ca,
            "cert_file": site.gateway_cert,
            "key_file": site.gateway_tls_key,
        },
        "api": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": info.api_port,
            "cert_file": site.api_cert,
            "key_file": site.api_key,
            "tokens": [
                {
                    "name": ADMIN_TOKEN_HOLDER,
                    "role": "admin",
                    "districts": ["*"],
                    "token_file": site.admin_token,
                },
                {
                    "name": CENTRAL_TOKEN_HOLDER,
                    "role": "operator",
                    "districts": ["*"],
                    "token_file": site.token_file(CENTRAL_TOKEN_HOLDER),
                },
            ],
        },
        "privacy": {"key_file": site.data_key},
        "enrol": {"site_dir": site.root},
        "video": {"recordings_dir": state / "recordings"},
        "centres": [
            {"name": "central", "url": centre_url, "secret": centre_secret, "districts": ["*"]}
        ],
    }
    return render_toml(
        config,
        header=["written by `ansimi provision init-site`; every option: gateway.example.toml"],
        comments={
            "api": "The operator API, HTTPS from the site CA (renew: `ansimi provision api-cert`)."
            "\nOn loopback: for devices enrolling over the network, set host to an address they "
            "reach\n(the certificate names localhost, 127.0.0.1 and every --broker-name)."
            "\nThe central token sees every district. A district's own operator desk: make a "
            "token\nfile (`openssl rand -hex 32 > FILE; chmod 600 FILE`) and add, after the "
            'others:\n[[api.tokens]]\nname = "mapo-desk"\nrole = "operator"\n'
            'districts = ["mapo"]\ntoken_file = "FILE"',
            "enrol": "devices enrol through POST /enrol on the API above (HTTPS, admin token)",
            "centres": "Where alerts go: every district's to this central centre. By default the "
            "local console:\nstart it with ANSIMI_CENTRE_SECRET set to this secret (`ansimi "
            "console --listen\n127.0.0.1:8080`). Replace it with your control centres "
            "(gateway/routing.example.toml).",
        },
    )


def _build(
    at: SiteLayout, final: SiteLayout, info: SiteInfo, now: dt.datetime | None, centre_url: str
) -> tuple[list[tuple[Path, int]], list[str]]:
    """Write a complete site into `at`, with paths inside its files pointing to `final`."""
    made: list[Path] = []
    owners = broker_owners()
    files_owner: Owner | None = owners[0] if owners else None
    data_owner: Owner | None = owners[1] if owners else None

    # the site root must be traversable by the broker's user; ca/ and gateway/ are private
    os.chmod(at.root, 0o755)  # noqa: S103 - lists names only; the secrets are in 0700 dirs
    make_dir(at.ca_dir, mode=0o700)
    make_dir(at.issued_dir, mode=0o700)
    ca = pki.create_ca(info.name, key_type=info.key_type, now=now)
    pki.write_private_key(at.ca_key, ca.key)
    pki.write_cert(at.ca_cert, ca.cert)
    made += [at.ca_key, at.ca_cert]

    make_dir(at.gateway_dir, mode=0o700)
    signing = generate_signing_key()
    save_private_key(at.gateway_key, signing)
    write_atomic(at.gateway_pub, (public_key_to_b64(signing.public_key()) + "\n").encode())
    tls_key = pki.generate_key(info.key_type)
    gateway_cert = pki.issue_client_cert(ca, info.gateway_id, tls_key.public_key(), now=now)
    pki.write_private_key(at.gateway_tls_key, tls_key)
    pki.write_cert(at.gateway_cert, gateway_cert)
    pki.write_cert(at.gateway_ca, ca.cert)
    pki.write_cert(at.issued_path(gateway_cert.serial_number), gateway_cert)
    _write_api_cert(at, ca, info, now)
    make_dir(at.tokens_dir, mode=0o700)
    for holder in (ADMIN_TOKEN_HOLDER, CENTRAL_TOKEN_HOLDER):
        write_atomic(at.token_file(holder), (secrets.token_hex(32) + "\n").encode(), mode=0o600)
    create_key_file(at.data_key)
    if not info.system_state:
        # the systemd unit makes the system's state directory; a site's own is made here
        make_dir(at.state_dir, mode=0o700)
    toml = gateway_toml(final, info, centre_url, secrets.token_hex(32))
    write_atomic(at.gateway_config, toml.encode(), mode=0o600)
    made += [at.gateway_key, at.gateway_pub, at.gateway_tls_key, at.gateway_cert, at.gateway_ca]
    made += [at.api_cert, at.api_key, at.admin_token, at.token_file(CENTRAL_TOKEN_HOLDER)]
    made += [at.data_key, at.gateway_config]
    if not info.system_state:
        made.append(at.state_dir)

    broker = at.broker
    make_dir(at.broker_dir, mode=0o750 if files_owner else 0o700, owner=files_owner)
    make_dir(broker.data_dir, mode=0o750 if data_owner else 0o700, owner=data_owner)
    server_key, server_cert = pki.issue_server_cert(
        ca, info.broker_names, key_type=info.key_type, now=now
    )
    pki.write_private_key(broker.key_file, server_key, owner=files_owner)
    pki.write_cert(broker.cert_file, server_cert, owner=files_owner)
    pki.write_cert(broker.ca_file, ca.cert, owner=files_owner)
    revocations = RevocationList()
    write_atomic(at.revocations_file, revocations.model_dump_json(indent=2).encode(), mode=0o600)
    crl = pki.build_crl(ca, [], crl_number=revocations.crl_number, now=now)
    write_atomic(broker.crl_file, pki.crl_to_pem(crl), owner=files_owner)
    write_atomic(broker.acl_file, render_acl([info.gateway_id]).encode(), owner=files_owner)
    config = broker_config(final.broker, host=info.listen_host, port=info.listen_port)
    write_atomic(at.broker_conf, config.render().encode(), owner=files_owner)
    made += [broker.key_file, broker.cert_file, broker.ca_file, broker.crl_file, broker.acl_file]
    made += [at.broker_conf, broker.data_dir, at.revocations_file]

    write_atomic(at.site_file, info.model_dump_json(indent=2).encode() + b"\n")
    made.append(at.site_file)

    notes = [
        f"start the broker with: mosquitto -c {final.broker_conf}",
        f"start the gateway with: ansimi gateway run --config {final.gateway_config}",
        f"the operator API: {info.api_url} (HTTPS from the site CA); admin token in "
        f"{final.admin_token}, the central operator's in "
        f"{final.token_file(CENTRAL_TOKEN_HOLDER)}",
        f"every district's alerts go to the central centre at {centre_url}; its HMAC secret "
        f"is in {final.gateway_config} ([[centres]]): give the centre the same secret",
    ]
    if os.geteuid() != 0:
        notes.append(
            "the broker's files belong to you: a mosquitto started as root drops to user "
            "'mosquitto' and could not read them. Run init-site as root for a system broker"
        )
    elif files_owner is None:
        notes.append("there is no 'mosquitto' user here: install mosquitto before starting it")
    listed = [(final.root / p.relative_to(at.root), p.stat().st_mode & 0o777) for p in made]
    return listed, notes
