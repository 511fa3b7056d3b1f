"""`ansimi device enrol`: make this device's key here, and trade a one-time token for its
certificate.

Run on the device, it checks the clock against the gateway (a device whose clock is off
would sign every message outside the gateway's window), makes an Ed25519 key that never
leaves the device, sends a CSR with the token to the gateway's `POST /enrol` over HTTPS,
and writes the key (0600), its certificate, the site CA and `/etc/ansimi/device.toml`.
Nothing is written unless the gateway said yes, and an existing key is kept unless
`--force` (a rotation) replaces it; the old key is replaced only once the new certificate
is in hand.

Two other ways in, for the installer's laptop:
- `--ssh user@host` runs this same command on the device over SSH; the token (and the CA,
  if given) travel on SSH's stdin, never on a command line where `ps` would show them.
- `--write-key-to DIR` makes the key *here* and writes everything into DIR for an SD card.
  The key then existed off the device: the command says so, loudly.

Exit codes: 0 enrolled; 1 a local problem (existing key, files, clock); 2 usage;
3 the gateway refused (token expired, used, unknown, other device; CSR refused);
4 the gateway could not be reached or not trusted (missing or wrong CA).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import functools
import os
import ssl
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, ParamSpec

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from ansimi.config import ConfigError, load_config
from ansimi.files import fsync_dir
from ansimi.jsonhttp import Unreachable, request_json
from ansimi.tomlwrite import render_toml
from device.config import DeviceConfig
from device.errors import DeviceError
from protocol.keys import generate_key, private_key_to_pem
from siteca.remote import ssh_command

DEFAULT_CONFIG_OUT: Final = Path("/etc/ansimi/device.toml")
DEFAULT_STATE_DIR: Final = Path("/var/lib/ansimi/device")
# The gateway refuses messages more than 300 s (its default window) from its clock; refuse
# well inside that, and leave room for the Date header's one-second resolution.
MAX_SKEW_S: Final = 120.0
# the reference wiring (device.example.toml): the panic button on GPIO17 and a doorbell's
# bell push on GPIO27, the same on every supported board (the Pi's 40-pin header)
DEFAULT_PINS: Final[Mapping[str, Mapping[str, int]]] = {
    "bell": {"emergency_pin": 17},
    "store": {"emergency_pin": 17},
    "doorbell": {"emergency_pin": 17, "doorbell_pin": 27},
}
# what the kernel says the board is; absent on a PC
BOARD_MODEL_FILE: Final = Path("/proc/device-tree/model")
HTTP_TIMEOUT_S: Final = 15.0

EXIT_LOCAL: Final = 1
EXIT_REFUSED: Final = 3
EXIT_UNREACHABLE: Final = 4

P = ParamSpec("P")


class EnrolError(DeviceError, RuntimeError):
    """An enrolment that failed, with the exit code it means (see the module docstring)."""

    def __init__(self, message: str, exit_code: int = EXIT_LOCAL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _EnrollExit(click.ClickException):
    """An EnrolError as click shows it and exits with it: the CLI edge."""

    def __init__(self, error: EnrolError) -> None:
        super().__init__(str(error))
        self.code = error.exit_code

    # click exits with `exit_code`; a class attribute there, so a property here
    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return self.code


def _at_the_cli_edge(command: Callable[P, None]) -> Callable[P, None]:
    """Domain errors stay domain errors below; only the command turns them into click's."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except EnrolError as exc:
            raise _EnrollExit(exc) from exc

    return run


@dataclass(frozen=True, slots=True)
class Paths:
    """Where the files go (`write_to`) and where the device will find them (`on_device`)."""

    write_to: Path
    on_device: Path
    config_out: Path

    def key(self, *, here: bool = True) -> Path:
        return (self.write_to if here else self.on_device) / "device.key"

    def cert(self, *, here: bool = True) -> Path:
        return (self.write_to if here else self.on_device) / "device.crt"

    def ca(self, *, here: bool = True) -> Path:
        return (self.write_to if here else self.on_device) / "ca.crt"


# ---- talking to the gateway ----------------------------------------------------------------


def _context(ca_pem: str | None) -> ssl.SSLContext:
    if ca_pem is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cadata=ca_pem)


def _request(
    url: str, context: ssl.SSLContext, body: Mapping[str, Any] | None = None
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    try:
        answer = request_json(
            "GET" if body is None else "POST",
            url,
            body,
            context=context,
            timeout_s=HTTP_TIMEOUT_S,
        )
    except Unreachable as exc:
        if exc.untrusted:
            raise EnrolError(
                f"the gateway at {url} is not trusted ({exc.reason}): pass "
                "--ca-file with the site CA certificate (the site's ca/ca.crt, from the "
                "installer)",
                EXIT_UNREACHABLE,
            ) from None
        raise EnrolError(
            f"cannot reach the gateway at {url}: {exc.reason}. Fix: {exc.fix} (the gateway's "
            "URL is the one `ansimi provision device add` printed, its [api] port)",
            EXIT_UNREACHABLE,
        ) from None
    return answer.status, answer.body, answer.headers


def clock_skew_s(headers: Mapping[str, str], now: dt.datetime) -> float | None:
    """Seconds this clock is ahead of the gateway's (its Date header); None without one."""
    text = headers.get("Date") or headers.get("date")
    if not text:
        return None
    try:
        theirs = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return (now - theirs).total_seconds()


def check_clock(headers: Mapping[str, str], now: dt.datetime, max_skew_s: float) -> None:
    skew = clock_skew_s(headers, now)
    if skew is None or abs(skew) <= max_skew_s:
        return
    way = "ahead of" if skew > 0 else "behind"
    raise EnrolError(
        f"this device's clock is {abs(skew):.0f} s {way} the gateway's (limit {max_skew_s:g} s): "
        "its messages would be refused. Set the time (`timedatectl set-ntp true`, or "
        f"`date -s '{headers.get('Date', '')}'`) and run this again; the token is still unused"
    )


def make_csr(key: Ed25519PrivateKey, device_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# ---- files ---------------------------------------------------------------------------------


def render_config(config: DeviceConfig) -> str:
    """Every field of `config` as TOML; unset optional keys appear commented out."""
    text = render_toml(
        config.model_dump(mode="json"),
        header=["written by `ansimi device enrol`; every option: device/device.example.toml"],
    )
    # what we write must read back as the same config, or the device would not start
    if DeviceConfig.model_validate(tomllib.loads(text)) != config:
        raise EnrolError("internal error: the written config does not read back the same")
    return text


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` beside `path`, created with `mode`, flushed; the caller renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def install(files: list[tuple[Path, bytes, int]]) -> None:
    """Stage every file first, then rename each into place: a full disk or a bad directory
    stops us before anything is replaced."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise EnrolError(
            f"cannot write {exc.filename}: {exc.strerror}. Nothing was changed"
        ) from None
    for tmp, path in staged:
        os.replace(tmp, path)
    for directory in {path.parent for _, path in staged}:
        fsync_dir(directory)


# ---- the enrolment -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Enrolled:
    device_id: str
    serial: str
    config_path: Path
    key_path: Path
    rotated: bool
    warnings: tuple[str, ...] = ()


def board_model(path: Path = BOARD_MODEL_FILE) -> str:
    """The board's model as the device tree names it ("Raspberry Pi 4 Model B..."), or ""."""
    try:
        return path.read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return ""


def hardware_for(kind: str, model: str) -> tuple[dict[str, Any], str | None]:
    """A new device's [hardware]: real pins on a Raspberry Pi, fakes elsewhere (with the
    warning that says so), and the pins its kind needs."""
    pins = dict(DEFAULT_PINS.get(kind, DEFAULT_PINS["bell"]))
    if model.startswith("Raspberry Pi"):
        return {"driver": "gpiozero", **pins}, None
    return {"driver": "fake", **pins}, (
        f"this machine is not a Raspberry Pi ({model or 'no board model'}): device.toml uses "
        'driver = "fake" (no buttons, LED or buzzer are driven). On the bell itself it is '
        '"gpiozero"; set [hardware] driver by hand if this board has GPIO'
    )


def enrol(
    gateway: str,
    token: str,
    paths: Paths,
    *,
    ca_pem: str | None = None,
    force: bool = False,
    max_skew_s: float = MAX_SKEW_S,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    insecure_http: bool = False,
    model: str | None = None,
) -> Enrolled:
    """`model`: the board's (board_model() when None), which picks the driver."""
    gateway = gateway.rstrip("/")
    if not gateway.startswith("https://") and not insecure_http:
        secure = "https://" + (gateway.partition("://")[2] or gateway)
        raise EnrolError(
            f"--gateway {gateway!r} must be an https:// URL: the token and the certificate "
            f"travel in it. Fix: --gateway {secure} (the gateway's API is HTTPS only)",
            2,
        )
    token = token.strip()
    device_id = token.partition(".")[0]
    if not device_id or "." not in token:
        raise EnrolError(
            "this is not an enrolment token (expected <device-id>.<code>): copy it whole "
            "from `ansimi provision device add`",
            2,
        )
    key_path = paths.key()
    if key_path.exists() and not force:
        raise EnrolError(
            f"a device key already exists at {key_path}: this device is enrolled. To give it "
            "a new key (a rotation), run again with --force; the old key is kept until the "
            "new certificate arrives"
        )
    existing: DeviceConfig | None = None
    if paths.config_out.exists():
        try:
            existing = load_config(paths.config_out, DeviceConfig)
        except ConfigError as exc:
            raise EnrolError(f"{exc}. Fix or remove it, then run again") from None

    context = _context(ca_pem)
    status, _, headers = _request(f"{gateway}/healthz", context)
    check_clock(headers, now(), max_skew_s)

    key = generate_key()
    status, answer, headers = _request(
        f"{gateway}/enrol",
        context,
        {"token": token, "device_id": device_id, "csr_pem": make_csr(key, device_id)},
    )
    if status != 200:
        message = answer.get("error") or f"HTTP {status}"
        raise EnrolError(f"the gateway refused the enrolment: {message}", EXIT_REFUSED)
    warning = None
    try:
        cert_pem = str(answer["cert_pem"])
        issued_ca = str(answer["ca_pem"])
        broker = answer["broker"]
        x509.load_pem_x509_certificate(cert_pem.encode())
        sections = {
            "device": {
                "id": device_id,
                "kind": answer["kind"],
                "key_file": str(paths.key(here=False)),
                "data_key_file": str(paths.on_device / "privacy.key"),
                "state_dir": str(paths.on_device),
            },
            "gateway": {"id": answer["gateway_id"], "public_key": answer["gateway_public_key"]},
            "mqtt": {
                "host": broker["host"],
                "port": int(broker["port"]),
                "ca_file": str(paths.ca(here=False)),
                "cert_file": str(paths.cert(here=False)),
                "key_file": str(paths.key(here=False)),
            },
            # where the device renews its certificate before it expires (device/renew.py)
            "renew": {"gateway_url": gateway},
        }
        if answer.get("release_public_key"):
            # pinned for agent updates; `[update] root` stays the installer's to set
            sections["update"] = {"release_public_key": str(answer["release_public_key"])}
        if existing is None:
            # a rotation keeps the wiring the installer has; a new device gets its kind's
            sections["hardware"], warning = hardware_for(
                str(answer["kind"]), board_model() if model is None else model
            )
        base = (existing or DeviceConfig()).model_dump(mode="json")
        for name, values in sections.items():
            base[name] = {**base[name], **values}
        config = DeviceConfig.model_validate(base)
    except (KeyError, TypeError, ValueError) as exc:
        raise EnrolError(
            f"the gateway's answer is incomplete ({exc}): is {gateway} an Ansimi gateway?",
            EXIT_REFUSED,
        ) from None

    install(
        [
            (paths.cert(), cert_pem.encode(), 0o644),
            (paths.ca(), issued_ca.encode(), 0o644),
            # the device's phone numbers may be in it: not for other users
            (paths.config_out, render_config(config).encode(), 0o640),
            (key_path, private_key_to_pem(key), 0o600),
        ]
    )
    return Enrolled(
        device_id,
        str(answer.get("serial", "")),
        paths.config_out,
        key_path,
        bool(answer.get("rotated")),
        (warning,) if warning else (),
    )


def split_label_url(url: str) -> tuple[str, str | None]:
    """The QR label's text, `<gateway>/enrol#token=<token>`, as (gateway URL, token); any
    other URL comes back as it is, with no token."""
    base, _, fragment = url.partition("#")
    if not fragment.startswith("token=") or not base.rstrip("/").endswith("/enrol"):
        return url, None
    return base.rstrip("/").removesuffix("/enrol"), fragment.removeprefix("token=")


@click.command("enrol")
@click.option("--gateway", required=True, help="the gateway's HTTPS URL, e.g. https://gw:8443")
@click.option(
    "--token",
    help="the one-time enrolment token ('-': read stdin) [from --gateway if it is the label's "
    "URL, .../enrol#token=...]",
)
@click.option(
    "--ca-file",
    help="the site CA certificate the gateway's HTTPS certificate is signed by ('-': stdin)",
)
@click.option(
    "--config-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=DEFAULT_CONFIG_OUT,
    show_default=True,
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="where the key, certificate and CA go on the device",
)
@click.option("--force", is_flag=True, help="replace an existing key (a rotation)")
@click.option("--ssh", "ssh_target", help="run the enrolment on this device (user@host)")
@click.option("--remote-ansimi", default="ansimi", show_default=True, help="with --ssh")
@click.option(
    "--write-key-to",
    type=click.Path(file_okay=False, path_type=Path),
    help="offline: make the key HERE and write every file into this directory (SD card)",
)
@click.option("--max-clock-skew", type=float, default=MAX_SKEW_S, show_default=True)
@_at_the_cli_edge
def enrol_command(
    gateway: str,
    token: str | None,
    ca_file: str | None,
    config_out: Path,
    state_dir: Path,
    force: bool,
    ssh_target: str | None,
    remote_ansimi: str,
    write_key_to: Path | None,
    max_clock_skew: float,
) -> None:
    """Enrol this device: key made here, certificate from the gateway, config written."""
    if ssh_target and write_key_to:
        raise click.UsageError("--ssh and --write-key-to exclude each other")
    gateway, from_label = split_label_url(gateway)
    token = token or from_label
    if not token:
        raise click.UsageError(
            "pass --token, or the label's URL (.../enrol#token=...) as --gateway"
        )
    stdin_text = sys.stdin.read() if "-" in (token, ca_file) else ""
    if token == "-":  # noqa: S105 - '-' means stdin, not a password
        token, _, stdin_text = stdin_text.partition("\n")
    ca_pem: str | None = None
    if ca_file == "-":
        ca_pem = stdin_text.strip() + "\n" if stdin_text.strip() else None
        if ca_pem is None:
            raise EnrolError("--ca-file -: no CA certificate on stdin")
    elif ca_file:
        try:
            ca_pem = Path(ca_file).read_text()
        except OSError as exc:
            raise EnrolError(
                f"cannot read the CA certificate {ca_file}: {exc.strerror}. Copy the site's "
                "ca/ca.crt there"
            ) from None

    if ssh_target:
        argv = ssh_command(
            ssh_target,
            gateway,
            config_out=config_out,
            state_dir=state_dir,
            with_ca=ca_pem is not None,
            force=force,
            remote_ansimi=remote_ansimi,
        )
        feed = token.strip() + "\n" + (ca_pem or "")
        try:
            done = subprocess.run(argv, input=feed.encode(), check=False, timeout=300)
        except FileNotFoundError:
            raise EnrolError("ssh is not installed here", EXIT_UNREACHABLE) from None
        except subprocess.TimeoutExpired:
            raise EnrolError(f"ssh {ssh_target}: no result in 300 s", EXIT_UNREACHABLE) from None
        # 255 is ssh's own failure (unreachable, refused key); the rest are ours, passed on
        if done.returncode == 255:
            raise EnrolError(f"ssh to {ssh_target} failed (exit 255)", EXIT_UNREACHABLE)
        sys.exit(done.returncode)

    if write_key_to is not None:
        if not state_dir.is_absolute():
            raise click.UsageError(
                f"--state-dir {state_dir} is relative: with --write-key-to give the absolute "
                f"path the files will have on the device (e.g. {DEFAULT_STATE_DIR})"
            )
        paths = Paths(write_key_to, state_dir, write_key_to / "device.toml")
        click.secho(
            f"WARNING: the device key is being made on THIS computer, not on the device. It "
            f"will exist in {write_key_to} until you delete it: copy the files to the SD "
            "card, then `shred -u` the key here. Prefer enrolling on the device.",
            fg="yellow",
            err=True,
        )
    else:
        # device.toml is read by a service whose working directory is not this one
        paths = Paths(state_dir.absolute(), state_dir.absolute(), config_out.absolute())
    result = enrol(gateway, token, paths, ca_pem=ca_pem, force=force, max_skew_s=max_clock_skew)
    what = "re-keyed (rotation)" if result.rotated else "enrolled"
    click.echo(f"{result.device_id} {what}: certificate {result.serial}")
    click.echo(f"config: {result.config_path}; key: {result.key_path} (0600)")
    for warning in result.warnings:
        click.secho(f"WARNING: {warning}", fg="yellow", err=True)
    if write_key_to is not None:
        click.echo(
            f"copy {write_key_to}/device.key, device.crt, ca.crt to {state_dir} and "
            f"device.toml to {DEFAULT_CONFIG_OUT} on the SD card"
        )
    elif result.rotated:
        click.echo("restart the agent to use the new key: systemctl restart ansimi-device")
