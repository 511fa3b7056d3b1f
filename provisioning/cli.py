"""`ansimi provision`: the installer's commands.

Every command prints what it did for a person (rich), or with --json for a script. Errors
are the package's own, whose messages already say what to do; they exit with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ansimi.listen import PortTaken, check_free
from protocol.errors import ProtocolError
from provisioning.rabbitmq_cli import rabbitmq as _rabbitmq_group
from provisioning.revoke import (
    BrokerControl,
    RevokeResult,
    SignalBroker,
    SystemdBroker,
    revoke_certificate,
)
from siteca.errors import ProvisioningError
from siteca.site import InitResult, Site, init_site, serial_text

DIR_OPTION = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the site directory",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (ProvisioningError, ProtocolError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def provision() -> None:
    """Installer's tools: site CA, device identities, the broker's ACL and CRL."""


@provision.command("init-site")
@DIR_OPTION
@click.option("--site", "site_name", help="site name (a-z, 0-9, '-') [the directory's name]")
@click.option(
    "--broker-name",
    "broker_names",
    multiple=True,
    help="a host name or IP address devices dial, for the broker's certificate (repeat for "
    "several; localhost and 127.0.0.1 are always in it)",
)
@click.option("--listen", "listen_host", help="address the broker listens on [0.0.0.0]")
@click.option("--port", type=click.IntRange(1, 65535), help="the broker's TLS port [8883]")
@click.option(
    "--key-type",
    type=click.Choice(["ed25519", "p256"]),
    default="ed25519",
    show_default=True,
    help="key type of the CA, broker and gateway TLS keys (a new site only)",
)
@click.option("--force", is_flag=True, help="replace an existing site: a new CA, re-enrol all")
@click.option(
    "--centre-url",
    help="the central control centre's event endpoint, for every district's alerts "
    "[the local console, http://127.0.0.1:8080/events]",
)
@click.option(
    "--system",
    is_flag=True,
    help="installed system-wide: the gateway's database and recordings in "
    "/var/lib/ansimi/gateway [DIR/state]",
)
@click.option("--api-port", type=click.IntRange(1, 65535), help="the operator API's port [8480]")
@JSON_OPTION
def init_site_command(
    directory: Path,
    site_name: str | None,
    broker_names: tuple[str, ...],
    listen_host: str | None,
    port: int | None,
    key_type: str,
    force: bool,
    centre_url: str | None,
    system: bool,
    api_port: int | None,
    as_json: bool,
) -> None:
    """Create a site: its CA, the gateway's identity and config, the broker's TLS, ACL and
    CRL, the operator API's HTTPS certificate and tokens, and the data key.

    Running it again changes nothing. The site is built beside DIR and moved into place in
    one step, so an interrupted run leaves no half-made site.
    """
    with _errors():
        result = init_site(
            directory,
            site=site_name,
            broker_names=broker_names or None,
            listen_host=listen_host,
            port=port,
            key_type="p256" if key_type == "p256" else "ed25519",
            force=force,
            centre_url=centre_url,
            system=system,
            api_port=api_port,
        )
    taken = _ports_taken(result) if result.created else []
    if as_json:
        _print_json({**_init_json(result), "ports_taken": taken})
        return
    console = Console()
    info = result.site
    if result.created:
        console.print(
            f"[green]Created site[/] [bold]{info.name}[/] at {result.layout.root} "
            f"(gateway id [bold]{info.gateway_id}[/], broker on "
            f"{info.listen_host}:{info.listen_port})"
        )
        table = Table("file", "mode", box=None)
        for path, mode in result.files:
            table.add_row(str(path.relative_to(result.layout.root)), f"{mode:04o}")
        console.print(table)
    else:
        console.print(f"[yellow]Nothing changed:[/] {result.notes[0]}")
    for note in result.notes[1:] if not result.created else result.notes:
        console.print(f"- {note}", markup=False)  # notes name [[centres]], not markup
    for warning in taken:
        click.echo(f"WARNING: {warning}", err=True)


def _ports_taken(result: InitResult) -> list[str]:
    """The new site's ports another program holds now: its broker or its API would not
    start there. Said now, while a rebuild costs nothing (no device is enrolled yet)."""
    info = result.site
    taken = []
    for what, host, port, option in (
        ("the site's broker", info.listen_host, info.listen_port, "--port"),
        ("the gateway's API", "127.0.0.1", info.api_port, "--api-port"),
    ):
        try:
            check_free(what, host, port, f"run init-site again with {option} N --force")
        except PortTaken as exc:
            taken.append(str(exc))
    return taken


def _init_json(result: InitResult) -> dict[str, Any]:
    return {
        "created": result.created,
        "dir": str(result.layout.root),
        "site": result.site.model_dump(mode="json"),
        "files": [{"path": str(p), "mode": f"{m:04o}"} for p, m in result.files],
        "notes": result.notes,
    }


@provision.command("api-cert")
@DIR_OPTION
def api_cert_command(directory: Path) -> None:
    """Renew the operator API's HTTPS certificate from the site CA; restart the gateway."""
    with _errors():
        site = Site.open(directory)
        cert = site.renew_api_cert()
    click.echo(
        f"wrote {site.layout.api_cert} (valid until {cert.not_valid_after_utc:%Y-%m-%d}) and "
        f"its key; restart the gateway to serve it"
    )


@provision.command("doctor")
@DIR_OPTION
@JSON_OPTION
def doctor_command(directory: Path, as_json: bool) -> None:
    """Check a site end to end: certificates, file modes, broker (mutual TLS), the gateway's
    API and each centre. Prints a checklist; exit status 0 when every check passes, else 1."""
    from provisioning.doctor import check_site

    with _errors():
        checks = check_site(directory)
    if as_json:
        _print_json(
            {"ok": all(c.ok for c in checks), "checks": [dataclasses.asdict(c) for c in checks]}
        )
    else:
        for check in checks:
            mark = "[green]pass[/]" if check.ok else "[red]FAIL[/]"
            Console().print(f"{mark} [bold]{check.name}[/]: ", end="")
            Console().print(check.detail, markup=False, soft_wrap=True)
    if not all(c.ok for c in checks):
        sys.exit(1)


@provision.command("revoke")
@DIR_OPTION
@click.argument("target")
@click.option("--reason", default="", help="why (kept in ca/revocations.json)")
@click.option("--unit", default="mosquitto", show_default=True, help="systemd unit to reload")
@click.option(
    "--pid-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="reload the broker with this pid file instead of systemd",
)
@click.option("--no-reload", is_flag=True, help="only write the CRL and ACL")
@click.option("--no-kick", is_flag=True, help="leave a live connection of the identity open")
@click.option("--broker", "broker_address", help="HOST:PORT to reach the broker [the site's]")
@JSON_OPTION
def revoke_command(
    directory: Path,
    target: str,
    reason: str,
    unit: str,
    pid_file: Path | None,
    no_reload: bool,
    no_kick: bool,
    broker_address: str | None,
    as_json: bool,
) -> None:
    """Revoke TARGET: a device or gateway id (all its certificates) or a serial (hex).

    Updates the CRL and the ACL, reloads the broker, and disconnects a client still
    connected under the revoked identity. Prefix with cn: or serial: if ambiguous.
    """
    broker: BrokerControl | None = None
    if not no_reload:
        broker = SignalBroker.from_pid_file(pid_file) if pid_file else SystemdBroker(unit)
    with _errors():
        result = revoke_certificate(
            directory,
            target,
            broker=broker,
            kick=not no_kick,
            broker_address=_address(broker_address) if broker_address else None,
            reason=reason,
        )
    if as_json:
        _print_json(_revoke_json(result))
    else:
        _print_revoke(result)
    if result.reloaded and result.warnings:
        sys.exit(1)


@provision.command("diagnostic")
@DIR_OPTION
@click.argument("name")
@click.option("--device", "device_id", help="read only this device's topics [every device's up]")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", type=click.IntRange(1, 90), default=7, show_default=True)
@click.option("--unit", default="mosquitto", show_default=True, help="the broker's systemd unit")
@click.option("--pid-file", type=click.Path(path_type=Path), help="the broker's pid file")
@click.option("--no-reload", is_flag=True, help="only write the certificate and the ACL")
@JSON_OPTION
def diagnostic_command(
    directory: Path,
    name: str,
    device_id: str | None,
    out_dir: Path,
    days: int,
    unit: str,
    pid_file: Path | None,
    no_reload: bool,
    as_json: bool,
) -> None:
    """Issue a read-only diagnostic identity `diag-NAME` for `mosquitto_sub`.

    Never watch a site with a device's own certificate: the broker gives the watcher the
    device's client id and drops the device (its centres see it go offline). This identity
    reads every device's up topics (or one device's topics with --device) and cannot publish.
    """
    from provisioning.diagnostic import issue_diagnostic

    broker: BrokerControl | None = None
    if not no_reload:
        broker = SignalBroker.from_pid_file(pid_file) if pid_file else SystemdBroker(unit)
    with _errors():
        issued = issue_diagnostic(
            directory, name, out_dir, device_id=device_id, days=days, broker=broker
        )
    command = (
        f"mosquitto_sub -h HOST -p PORT --cafile {issued.ca_file} --cert {issued.cert_file} "
        f"--key {issued.key_file} -V mqttv5 -v -t '{issued.reads}'"
    )
    if as_json:
        _print_json(
            {
                "identity": issued.identity,
                "reads": issued.reads,
                "serial": serial_text(issued.serial),
                "not_after": issued.not_after.isoformat(),
                "cert_file": str(issued.cert_file),
                "key_file": str(issued.key_file),
                "ca_file": str(issued.ca_file),
                "reloaded": issued.reloaded,
                "command": command,
            }
        )
        return
    console = Console()
    console.print(f"[green]Issued[/] {issued.identity} (reads {issued.reads}, until "
                  f"{issued.not_after:%Y-%m-%d}); revoke with `ansimi provision revoke "
                  f"--dir {directory} {issued.identity}`")  # fmt: skip
    console.print(command, soft_wrap=True, markup=False)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"{text!r} is not HOST:PORT", param_hint="--broker")
    return host.strip("[]"), int(port)


def _revoke_json(result: RevokeResult) -> dict[str, Any]:
    def entry(r: Any) -> dict[str, Any]:
        data: dict[str, Any] = r.model_dump(mode="json")
        data["serial"] = serial_text(r.serial)
        return data

    return {
        "revoked": [entry(r) for r in result.revoked],
        "already_revoked": [entry(r) for r in result.already_revoked],
        "denied_identities": result.denied_identities,
        "crl_number": result.crl_number,
        "reloaded": result.reloaded,
        "kicked": result.kicked,
        "warnings": result.warnings,
    }


def _print_revoke(result: RevokeResult) -> None:
    console = Console()
    for r in result.revoked:
        console.print(f"[green]Revoked[/] {serial_text(r.serial)} ({r.common_name})")
    for r in result.already_revoked:
        console.print(f"Already revoked: {serial_text(r.serial)} ({r.common_name})")
    if result.denied_identities:
        console.print("Denied everything by the ACL: " + ", ".join(result.denied_identities))
    console.print(f"CRL number {result.crl_number} written")
    if result.reloaded:
        console.print("[green]Broker reloaded[/]: the revoked certificate cannot connect")
    for cn in result.kicked:
        console.print(f"Disconnected any live connection of {cn}")
    for warning in result.warnings:
        console.print(f"[yellow]Warning:[/] {warning}")


def _print_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2))


from provisioning.device_cli import device_group  # noqa: E402 - its own module

provision.add_command(device_group)

from provisioning.config_cli import config_group  # noqa: E402 - its own module

provision.add_command(config_group)


# the RabbitMQ cluster's side: its own module (provisioning/rabbitmq_cli.py)
provision.add_command(_rabbitmq_group)

# agent releases and staged rollouts: their own module (provisioning/release_cli.py)
from provisioning.release_cli import release_group, rollout_group  # noqa: E402

provision.add_command(release_group)
provision.add_command(rollout_group)
