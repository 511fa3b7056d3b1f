"""`ansimi provision config`: remote device configuration at the gateway (set, show, drift).

A layer is written as a small TOML file with device.toml's own sections and keys (only
those a gateway may set: protocol/remote_config.py REMOTE_KEYS), for the whole site, a
district or one device; the later wins key by key. The gateway sends each device it
touches its merged config, signed; `drift` shows who runs what.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from provisioning.device_cli import (
    EXIT_CHECK_FAILED,
    GatewayAccess,
    _errors,
    _fail,
    _print_json,
    gateway_options,
    site_dir_option,
)


@click.group("config")
def config_group() -> None:
    """Remote device configuration: set a layer (site, district, device), show, drift."""


def _read_layer(source: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        return tomllib.loads(text)
    except OSError as exc:
        raise click.UsageError(f"cannot read {source}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.UsageError(f"{source} is not TOML: {exc}") from None


@config_group.command("set")
@click.argument("source", required=False)
@click.option("--district", help="the district's layer (default: the whole site's)")
@click.option("--device", "device_id", help="one device's own layer")
@click.option("--clear", is_flag=True, help="remove the layer instead of replacing it")
@site_dir_option
@gateway_options
def set_command(
    source: str | None,
    district: str | None,
    device_id: str | None,
    clear: bool,
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Replace a config layer with SOURCE (a TOML file of device.toml sections, `-` for
    stdin), or remove it with --clear. Devices it touches are sent their config at once."""
    if district is not None and device_id is not None:
        raise click.UsageError("give --district or --device, not both")
    if clear == (source is not None):
        raise click.UsageError("give a SOURCE file, or --clear")
    layer = None if source is None else _read_layer(source)
    with _errors(as_json):
        answer = gateway.client(site_dir).set_config_layer(district, device_id, layer)
    if as_json:
        _print_json({"ok": True, **answer})
        return
    where = f"device {device_id}" if device_id else f"district {district}" if district else "site"
    what = "removed" if clear else f"set ({str(answer.get('hash', ''))[:12]})"
    click.echo(f"{where} layer {what}; {answer.get('devices_sent', 0)} devices sent their config")


@config_group.command("show")
@site_dir_option
@gateway_options
def show_command(site_dir: Path | None, gateway: GatewayAccess, as_json: bool) -> None:
    """The layers the gateway keeps: site, then districts, then devices."""
    with _errors(as_json):
        layers = gateway.client(site_dir).config_layers()
    if as_json:
        _print_json({"ok": True, "layers": layers})
        return
    if not layers:
        click.echo("no remote config: every device runs its device.toml")
    for layer in layers:
        name = f" {layer['name']}" if layer["name"] else ""
        click.echo(f"# {layer['scope']}{name} ({str(layer['hash'])[:12]})")
        if layer.get("numbers_needed"):
            click.echo("# SMS numbers sealed to its key before a rotation: add [sms] numbers")
        for section, keys in layer["config"].items():
            click.echo(f"[{section}]")
            for key, value in keys.items():
                click.echo(f"{key} = {_toml_value(value)}")
        click.echo("")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value)


@config_group.command("drift")
@click.option("--district", help="only this district's devices")
@site_dir_option
@gateway_options
def drift_command(
    district: str | None, site_dir: Path | None, gateway: GatewayAccess, as_json: bool
) -> None:
    """Each device's desired config hash against the one its heartbeat reports; exit 5 if
    any device runs another config than the one desired."""
    with _errors(as_json):
        rows = gateway.client(site_dir).config_drift()
    if district is not None:
        rows = [r for r in rows if r["district"] == district]
    drifting = [r for r in rows if r["state"] == "drift"]
    # SMS numbers sealed to a key the device no longer has (rotated): only an admin can
    # give them again, the gateway never kept them
    needing = [r for r in rows if r.get("numbers_needed")]
    if as_json:
        _print_json({"ok": not drifting and not needing, "devices": rows})
    else:
        for r in rows:
            reported = str(r["reported_hash"] or "-")[:12]
            click.echo(
                f"{r['device_id']:<24} {r['district']:<14} {r['state']:<8} "
                f"desired {str(r['desired_hash'])[:12]} reported {reported}"
                + ("  numbers_needed" if r.get("numbers_needed") else "")
            )
        click.echo(f"{len(rows)} devices, {len(drifting)} drifting")
        for r in needing:
            click.echo(
                f"{r['device_id']}: its SMS numbers were sealed to its key before a rotation "
                "and are no longer sent. Fix: copy its layer from `ansimi provision config "
                "show`, add [sms] numbers = [...], and run `ansimi provision config set "
                f"--device {r['device_id']} FILE`"
            )
    if drifting or needing:
        if as_json:
            sys.exit(EXIT_CHECK_FAILED)
        message = f"{len(drifting)} devices run another config than the one desired"
        if needing:
            message += f"; {len(needing)} need their SMS numbers set again"
        _fail(message, EXIT_CHECK_FAILED, False)
