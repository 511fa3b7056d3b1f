"""`ansimi provision device ...`: add, list, show, revoke, decommission, rotate, check.

Where the gateway is: `--gateway URL` or `ANSIMI_GATEWAY_URL`; its admin token:
`--admin-token-file`, `ANSIMI_ADMIN_TOKEN_FILE` or `ANSIMI_ADMIN_TOKEN` (never an argument);
the CA its HTTPS certificate is checked against: `--ca-file`, else the site's (`--dir`).

Exit codes, for scripts:
  0  done (check: every item passed)
  1  refused here: bad input (unknown district, bad id), missing site, CA or token file
  2  usage error (click)
  3  the gateway refused (duplicate id, unknown device, used or expired token...)
  4  the gateway could not be reached, or its certificate is not trusted
  5  check: at least one item failed
  6  partly done (revoke: the broker was not reloaded; rotate: not finished): run it again
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NoReturn

import click
from rich.console import Console
from rich.table import Table

from protocol.errors import ProtocolError
from provisioning import devices as ops
from provisioning.gateway_admin import (
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    URL_ENV,
    AdminClient,
    GatewayRefused,
    GatewayUnreachable,
    admin_token,
)
from provisioning.identity import DEVICE_IDENTITY_LOADER
from provisioning.revoke import BrokerControl, SignalBroker, SystemdBroker
from siteca.errors import ProvisioningError
from siteca.remote import ssh_command
from siteca.site import CENTRAL_TOKEN_HOLDER, Site

EXIT_OK: Final = 0
EXIT_INPUT: Final = 1
EXIT_REFUSED: Final = 3
EXIT_UNREACHABLE: Final = 4
EXIT_CHECK_FAILED: Final = 5
EXIT_PARTIAL: Final = 6


def _fail(message: str, code: int, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": message, "exit_code": code}, indent=2))
    else:
        # not rich: it would wrap the message at the terminal's width, mid-command
        click.secho(f"Error: {message}", err=True, fg="red")
    sys.exit(code)


@contextmanager
def _errors(as_json: bool) -> Iterator[None]:
    try:
        yield
    except GatewayUnreachable as exc:
        _fail(str(exc), EXIT_UNREACHABLE, as_json)
    except GatewayRefused as exc:
        _fail(f"the gateway refused: {exc}", EXIT_REFUSED, as_json)
    except (ops.PartialRevocation, ops.RotationIncomplete) as exc:
        _fail(str(exc), EXIT_PARTIAL, as_json)
    except (ProvisioningError, ProtocolError) as exc:
        _fail(str(exc), EXIT_INPUT, as_json)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.UTC):%Y-%m-%d %H:%M} UTC"


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@dataclass(frozen=True)
class GatewayAccess:
    """--gateway, --admin-token-file and --ca-file as given: the gateway to ask, and how."""

    url: str | None
    token_file: Path | None
    ca_file: Path | None

    def client(self, site_dir: Path | None) -> AdminClient:
        # a missing site says so (and how to fix it) rather than "no CA certificate"
        site = Site.open(site_dir) if site_dir is not None else None
        url = self._url(site)
        ca_file = self.ca_file or (site.layout.ca_cert if site else None)
        token_file = self.token_file
        if token_file is None and site is not None and not _token_in_environment():
            token_file = site.layout.admin_token
        return AdminClient(url, admin_token(token_file), ca_file=ca_file)

    def _url(self, site: Site | None) -> str:
        url = self.url or os.environ.get(URL_ENV) or (site.info.api_url if site else None)
        if not url:
            raise click.UsageError(
                f"pass --gateway URL or set {URL_ENV}, or --dir SITE on the gateway's machine"
            )
        return url

    def operator_client(self, site_dir: Path | None, token_file: Path | None) -> AdminClient:
        """The same gateway, asked with an operator's token: --operator-token-file, else the
        site's central operator token."""
        if token_file is None:
            if site_dir is None:
                raise click.UsageError("pass --operator-token-file, or --dir SITE")
            token_file = Site.open(site_dir).layout.token_file(CENTRAL_TOKEN_HOLDER)
        site = Site.open(site_dir) if site_dir is not None else None
        url = self._url(site)
        ca_file = self.ca_file or (site.layout.ca_cert if site else None)
        return AdminClient(url, admin_token(token_file), ca_file=ca_file, role="operator")


def _token_in_environment() -> bool:
    return bool(os.environ.get(TOKEN_FILE_ENV) or os.environ.get(TOKEN_ENV))


@dataclass(frozen=True)
class BrokerAccess:
    """--unit, --pid-file, --no-reload and --broker as given, checked only where a command
    uses them: `rotate` handing out a token stops before it gets to the broker."""

    unit: str
    pid_file: Path | None
    no_reload: bool
    address_text: str | None

    def control(self) -> BrokerControl | None:
        if self.no_reload:
            return None
        return (
            SignalBroker.from_pid_file(self.pid_file) if self.pid_file else SystemdBroker(self.unit)
        )

    def address(self) -> tuple[str, int] | None:
        if self.address_text is None:
            return None
        host, _, port = self.address_text.rpartition(":")
        if not host or not port.isdigit():
            raise click.BadParameter(
                f"{self.address_text!r} is not HOST:PORT", param_hint="--broker"
            )
        return host.strip("[]"), int(port)


def gateway_options(command: Callable[..., None]) -> Callable[..., None]:
    """--gateway, --admin-token-file, --ca-file and --json. The command receives the first
    three as one `gateway: GatewayAccess`, and `as_json`."""

    @functools.wraps(command)
    def with_gateway_access(
        *, gateway: str | None, admin_token_file: Path | None, ca_file: Path | None, **params: Any
    ) -> None:
        command(gateway=GatewayAccess(gateway, admin_token_file, ca_file), **params)

    f = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")(
        with_gateway_access
    )
    f = click.option(
        "--ca-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA of the gateway's HTTPS certificate [the site's ca/ca.crt with --dir]",
    )(f)
    f = click.option(
        "--admin-token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="file holding the gateway's admin token [$ANSIMI_ADMIN_TOKEN_FILE]",
    )(f)
    f = click.option("--gateway", help=f"the gateway's URL [${URL_ENV}]")(f)
    return f


def broker_options(command: Callable[..., None]) -> Callable[..., None]:
    """--unit, --pid-file, --no-reload and --broker; the command receives them as one
    `broker: BrokerAccess`."""

    @functools.wraps(command)
    def with_broker_access(
        *,
        unit: str,
        pid_file: Path | None,
        no_reload: bool,
        broker_address: str | None,
        **params: Any,
    ) -> None:
        command(broker=BrokerAccess(unit, pid_file, no_reload, broker_address), **params)

    f = click.option("--broker", "broker_address", help="HOST:PORT of the broker [the site's]")(
        with_broker_access
    )
    f = click.option("--no-reload", is_flag=True, help="only write the CRL and ACL")(f)
    f = click.option(
        "--pid-file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="reload the broker with this pid file instead of systemd",
    )(f)
    f = click.option("--unit", default="mosquitto", show_default=True, help="systemd unit")(f)
    return f


site_dir_option = click.option(
    "--dir",
    "site_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="the site directory (CA, issued certificates, broker files)",
)
# revoke, decommission and rotate write the site's CRL and ACL: they cannot go without it
required_site_dir_option = click.option(
    "--dir", "site_dir", required=True, type=click.Path(file_okay=False, path_type=Path)
)


@click.group("device")
def device_group() -> None:
    """Device identities: add (token + QR label), list, show, revoke, decommission, rotate,
    check."""


@device_group.command("add")
@click.option("--type", "kind", type=click.Choice(["bell", "doorbell", "store"]), required=True)
@click.option("--district", required=True, help="one of Seoul's 25 district codes, e.g. mapo")
@click.option("--label", default="", help="a label for people (no address: it is shown)")
@click.option("--id", "device_id", help="device id [<type>-<6 hex digits>]")
@click.option(
    "--ttl-hours", type=click.FloatRange(1 / 60, 14 * 24), default=24.0, show_default=True
)
@click.option(
    "--qr-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="where the QR label goes (<id>.png and <id>.svg, 0600: it holds the token)",
)
@click.option("--force-label", is_flag=True, help="overwrite an existing label file")
@site_dir_option
@gateway_options
def add_command(
    kind: str,
    district: str,
    label: str,
    device_id: str | None,
    ttl_hours: float,
    qr_dir: Path,
    force_label: bool,
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Register a device and print its one-time enrolment token and QR label."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        added = ops.add_device(
            client,
            "doorbell" if kind == "doorbell" else "store" if kind == "store" else "bell",
            district,
            label,
            device_id=device_id,
            qr_dir=qr_dir,
            ttl_s=int(ttl_hours * 3600),
            force_label=force_label,
        )
    if as_json:
        _print_json(
            {
                "ok": True,
                "device_id": added.device_id,
                "kind": added.kind,
                "district": added.district,
                "label": added.label,
                "token": added.token,
                "expires_ms": added.expires_ms,
                "url": added.url,
                "qr_png": str(added.qr_png),
                "qr_svg": str(added.qr_svg),
            }
        )
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(
        f"[green]Registered[/] [bold]{added.device_id}[/] ({added.kind}, {added.district})"
    )
    console.print(f"Enrolment token (one use, until {_when(added.expires_ms)}):")
    console.print(f"  [bold]{added.token}[/]")
    console.print(f"QR label: {added.qr_png}  {added.qr_svg}")
    console.print("On the device:")
    console.print(f"  {ops.device_command(client.base_url, ca=client.ca_file is not None)}")


@device_group.command("list")
@site_dir_option
@gateway_options
def list_command(
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Every device the gateway has an enrolment for, and its state."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        views = ops.list_devices(client)
    if as_json:
        _print_json({"ok": True, "devices": [v.as_json() for v in views]})
        return
    table = Table("id", "type", "district", "label", "state", "online", "last seen")
    for v in views:
        online = "-" if v.online is None else ("yes" if v.online else "no")
        table.add_row(
            v.device_id, v.kind, v.district, v.label, v.state, online, _when(v.last_seen_ms)
        )
    Console().print(table)


@device_group.command("show")
@click.argument("device_id")
@site_dir_option
@gateway_options
def show_command(
    device_id: str,
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """One device: gateway record, enrolments, and (with --dir) its certificates."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        site = Site.open(site_dir) if site_dir is not None else None
        view = ops.show_device(client, device_id, site)
    if view is None:
        _fail(f"no device {device_id} at this gateway: `ansimi provision device list`", 3, as_json)
    if as_json:
        _print_json({"ok": True, "device": view.as_json()})
        return
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{view.device_id}[/]: {view.kind}, {view.district}, {view.state}")
    if view.label:
        console.print(f"label: {view.label}")
    console.print(f"last seen: {_when(view.last_seen_ms)}")
    enrolments = Table("created", "expires", "state", "rotation", "certificate", title="enrolments")
    for r in view.enrolments:
        enrolments.add_row(
            _when(r.get("created_ms")),
            _when(r.get("expires_ms")),
            str(r.get("state")),
            "yes" if r.get("rotate") else "no",
            str(r.get("serial") or "-"),
        )
    console.print(enrolments)
    if view.certificates:
        certs = Table("serial", "valid from", "until", "revoked", title="certificates")
        for c in view.certificates:
            certs.add_row(c["serial"], c["not_before"][:16], c["not_after"][:10], str(c["revoked"]))
        console.print(certs)


@device_group.command("revoke")
@click.argument("device_id")
@click.option("--reason", default="", help="why (kept in ca/revocations.json)")
@required_site_dir_option
@broker_options
@gateway_options
def revoke_command(
    device_id: str,
    reason: str,
    site_dir: Path,
    broker: BrokerAccess,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Revoke a device: its tokens, at the gateway (messages refused at once), and at the
    broker (certificate on the CRL, ACL deny, live session closed) within seconds."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        result = ops.revoke_device(
            client,
            site_dir,
            device_id,
            broker=broker.control(),
            broker_address=broker.address(),
            reason=reason,
        )
    report = _revocation_report(result)
    if as_json:
        _print_json(report)
    else:
        console = Console(highlight=False, soft_wrap=True)
        console.print(f"[green]Revoked[/] {device_id}")
        _print_revocation(console, result)
    if not result.complete:
        sys.exit(EXIT_PARTIAL)


def _revocation_report(result: ops.Revoked) -> dict[str, Any]:
    broker = result.broker
    return {
        "ok": result.complete,
        "device_id": result.device_id,
        "tokens_cancelled": result.tokens_cancelled,
        "revoked_at_gateway": result.at_gateway,
        "certificates_revoked": [f"{r.serial:X}" for r in broker.revoked] if broker else [],
        "broker_reloaded": broker.reloaded if broker else None,
        "kicked": broker.kicked if broker else [],
        "warnings": broker.warnings if broker else [],
    }


def _print_revocation(console: Console, result: ops.Revoked) -> None:
    broker = result.broker
    console.print(f"- unused tokens cancelled: {result.tokens_cancelled}")
    console.print(
        "- gateway: its messages are refused"
        if result.at_gateway
        else "- gateway: it never enrolled"
    )
    if broker is None:
        console.print("- broker: the CA never issued it a certificate")
        return
    for r in broker.revoked:
        console.print(f"- certificate {r.serial:X} on the CRL")
    if broker.reloaded:
        console.print(
            "- broker reloaded; live connection closed" if broker.kicked else "- broker reloaded"
        )
    for w in broker.warnings:
        console.print(f"[yellow]Warning:[/] {w}")


@device_group.command("test-press")
@click.argument("device_id")
@site_dir_option
@gateway_options
def test_press_command(
    device_id: str,
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Ask a bell for a test press now: a test alert over the whole path to its centres. One
    that does not come back delivered in time becomes a test_failed event for its district."""
    with _errors(as_json):
        known = gateway.client(site_dir).test_press(device_id)
    if not known:
        _fail(f"no device {device_id} at this gateway: `ansimi provision device list`", 3, as_json)
    if as_json:
        _print_json({"ok": True, "device_id": device_id, "asked": True})
        return
    click.echo(f"{device_id}: test press asked; watch for its delivered ack or a test_failed event")


@device_group.command("decommission")
@click.argument("device_id")
@required_site_dir_option
@broker_options
@gateway_options
def decommission_command(
    device_id: str, site_dir: Path, broker: BrokerAccess, gateway: GatewayAccess, as_json: bool
) -> None:
    """Take a device out of service for good: revoke it (as `revoke`) and wipe its personal
    data (address, phone numbers, notes, label) at the gateway. Its events stay, under the
    bare device id. On the device itself, run `ansimi device wipe`."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        result = ops.decommission_device(
            client,
            site_dir,
            device_id,
            broker=broker.control(),
            broker_address=broker.address(),
        )
    revoked = result.revoked
    if as_json:
        _print_json({**_revocation_report(revoked), "wiped_at_gateway": result.wiped_at_gateway})
    else:
        console = Console(highlight=False, soft_wrap=True)
        console.print(f"[green]Decommissioned[/] {device_id}")
        _print_revocation(console, revoked)
        console.print(
            "- gateway: personal data wiped; events kept under the device id"
            if result.wiped_at_gateway
            else "- gateway: it held nothing about it"
        )
        console.print("- on the device: run `ansimi device wipe`")
    if not revoked.complete:
        sys.exit(EXIT_PARTIAL)


@device_group.command("rotate")
@click.argument("device_id")
@required_site_dir_option
@click.option("--ssh", "ssh_target", help="run the re-enrolment on the device (user@host)")
@click.option("--remote-ansimi", default="ansimi", show_default=True)
@click.option(
    "--restart-command",
    default="sudo systemctl restart ansimi-device",
    show_default=True,
    help="with --ssh: run on the device after the new key is in place ('' for none)",
)
@click.option(
    "--device-config-out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/etc/ansimi/device.toml"),
    show_default=True,
    help="with --ssh: the device's config file",
)
@click.option(
    "--device-state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/ansimi/device"),
    show_default=True,
    help="with --ssh: where the device keeps its key and certificate",
)
@click.option("--finish", is_flag=True, help="revoke the old certificate once the new one works")
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True)
@click.option("--ttl-hours", type=click.FloatRange(1 / 60, 14 * 24), default=24.0)
@broker_options
@gateway_options
def rotate_command(
    device_id: str,
    site_dir: Path,
    ssh_target: str | None,
    remote_ansimi: str,
    restart_command: str,
    device_config_out: Path,
    device_state_dir: Path,
    finish: bool,
    wait_s: float,
    ttl_hours: float,
    broker: BrokerAccess,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Give a device a new key, made on the device; its old certificate is revoked only once
    the gateway has heard from it with the new one.

    With --ssh all steps run now. Without, this prints a rotation token for
    `ansimi device enrol --force` on the device; then run `rotate --finish`.
    """
    with _errors(as_json):
        client = gateway.client(site_dir)
        Site.open(site_dir)
        if not finish:
            rotation = ops.start_rotation(client, device_id, ttl_s=int(ttl_hours * 3600))
            if ssh_target is None:
                if as_json:
                    _print_json(
                        {
                            "ok": True,
                            "device_id": device_id,
                            "token": rotation.token,
                            "expires_ms": rotation.expires_ms,
                            "finished": False,
                        }
                    )
                else:
                    console = Console(highlight=False, soft_wrap=True)
                    console.print(
                        f"Rotation token for {device_id} (until {_when(rotation.expires_ms)}):"
                    )
                    console.print(f"  [bold]{rotation.token}[/]")
                    console.print(
                        "On the device: "
                        + ops.device_command(client.base_url, ca=True)
                        + " --force"
                    )
                    console.print(
                        f"Then: ansimi provision device rotate {device_id} --dir {site_dir}"
                        " --finish"
                    )
                sys.exit(EXIT_PARTIAL)
            ca_pem = client.ca_file.read_text() if client.ca_file else ""
            argv = ssh_command(
                ssh_target,
                client.base_url,
                config_out=device_config_out,
                state_dir=device_state_dir,
                with_ca=bool(ca_pem),
                force=True,
                remote_ansimi=remote_ansimi,
            )
            code = ops.run_remote_enrol(argv, rotation.token + "\n" + ca_pem)
            if code != 0:
                _fail(
                    f"the enrolment on {ssh_target} failed (exit {code}): the old key and "
                    "certificate are still in use; nothing was revoked",
                    EXIT_REFUSED if code == 3 else EXIT_UNREACHABLE if code in (4, 255) else 1,
                    as_json,
                )
            if restart_command:
                ops.run_remote_enrol([*argv[:5], restart_command], "")
        finished = ops.finish_rotation(
            client,
            site_dir,
            device_id,
            broker=broker.control(),
            broker_address=broker.address(),
            wait_s=wait_s,
        )
    if as_json:
        _print_json(
            {
                "ok": True,
                "device_id": device_id,
                "finished": True,
                "new_serial": finished.new_serial,
                "revoked": finished.revoked,
            }
        )
    else:
        Console(highlight=False, soft_wrap=True).print(
            f"[green]Rotated[/] {device_id}: now certificate {finished.new_serial}; "
            f"revoked {', '.join(finished.revoked) or 'nothing (no older certificate)'}"
        )


@device_group.command("set-private")
@click.argument("device_id")
@site_dir_option
@gateway_options
def set_private_command(
    device_id: str, site_dir: Path | None, gateway: GatewayAccess, as_json: bool
) -> None:
    """Record the address, floor, location and phone numbers of the home DEVICE_ID protects.

    Read as JSON from stdin, or asked for one by one at a terminal: never from arguments,
    which land in the shell's history. The gateway seals them and logs who set them; an
    admin cannot read them back (`show-private` asks with an operator's token).
    """
    from provisioning.private_input import from_json, from_prompts

    with _errors(as_json):
        if sys.stdin.isatty():
            data = from_prompts(lambda question, default: click.prompt(
                question, default=default, show_default=bool(default), err=True
            ))  # fmt: skip
        else:
            data = from_json(sys.stdin.read())
        gateway.client(site_dir).set_private(device_id, data)
    if as_json:
        _print_json({"ok": True, "device_id": device_id, "fields": sorted(data)})
    else:
        click.echo(f"stored the personal data of {device_id} ({', '.join(sorted(data))})")


@device_group.command("show-private")
@click.argument("device_id")
@site_dir_option
@click.option(
    "--operator-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="an operator token of the device's district [the site's central token with --dir]",
)
@gateway_options
def show_private_command(
    device_id: str,
    site_dir: Path | None,
    operator_token_file: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Show DEVICE_ID's personal data, as an operator of its district sees it.

    Admin tokens cannot read personal data back, by design: this asks with an operator's
    token (GET /devices/{id}/private), and the gateway logs the read under that token's name.
    """
    with _errors(as_json):
        client = gateway.operator_client(site_dir, operator_token_file)
        path = f"/devices/{urllib.parse.quote(device_id, safe='')}/private"
        answer = client.ok("GET", path)
    _print_json(answer.body)


@device_group.command("check")
@click.argument("device_id")
@site_dir_option
@click.option(
    "--device-config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="the device's device.toml (on the device): also connect as the device",
)
@gateway_options
def check_command(
    device_id: str,
    site_dir: Path | None,
    device_config: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """A checklist for one device: gateway, registration, certificate, broker, and (with
    --device-config) a real connection with the device's own certificate."""
    with _errors(as_json):
        client = gateway.client(site_dir)
        site = Site.open(site_dir) if site_dir is not None else None
        checks = ops.check_device(
            client,
            device_id,
            site=site,
            device_config=device_config,
            load_identity=click.get_current_context().meta.get(DEVICE_IDENTITY_LOADER),
        )
    failed = any(c.ok is False for c in checks)
    if as_json:
        _print_json(
            {
                "ok": not failed,
                "device_id": device_id,
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
            }
        )
    else:
        table = Table("check", "result", "detail", title=f"check {device_id}")
        mark = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]SKIP[/]"}
        for c in checks:
            table.add_row(c.name, mark[c.ok], c.detail)
        Console(width=120).print(table)
    if failed:
        sys.exit(EXIT_CHECK_FAILED)
