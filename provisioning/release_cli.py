"""`ansimi provision release ...` and `ansimi provision rollout ...`: agent updates.

    release key init --dir SITE        the site's release key (SITE/release/release.key, 0600);
                                       prints the public key devices and the gateway pin
    release build --dir SITE ...       a signed bundle of wheels (docs/fleet.md)
    release add BUNDLE                 checked here, then kept by the gateway
    rollout start VERSION --district D --percent P
    rollout status | resume [--percent P] | abort

The release key is neither the site CA's nor the gateway's: keep it off the gateway (on the
machine that builds releases), so a stolen gateway cannot ship code to the bells. Exit
codes are `ansimi provision device`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ansimi.bundle import build_bundle, read_bundle
from ansimi.files import write_atomic
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import generate_key, load_private_key, public_key_to_b64, save_private_key
from provisioning.device_cli import (
    EXIT_INPUT,
    GatewayAccess,
    _errors,
    _fail,
    _print_json,
    gateway_options,
    site_dir_option,
)
from siteca.site import SiteLayout

RELEASE_KID = "release"
DIR_OPTION = click.option(
    "--dir",
    "site_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the site directory (the release key is in its release/ folder)",
)


def _signer(site_dir: Path) -> Signer:
    key = load_private_key(
        SiteLayout(site_dir).release_key,
        hint="run `ansimi provision release key init --dir SITE` (or copy the site's "
        "release.key there on the machine that builds releases)",
    )
    return Signer(RELEASE_KID, key)


@click.group("release")
def release_group() -> None:
    """Agent releases: the release key, signed bundles, adding one to the gateway."""


@release_group.group("key")
def key_group() -> None:
    """The site's release signing key."""


@key_group.command("init")
@DIR_OPTION
@click.option("--force", is_flag=True, help="replace it: devices then refuse every new bundle")
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
def key_init(site_dir: Path, force: bool, as_json: bool) -> None:
    """Make the release key; print its public key for device.toml and gateway.toml.
    Enrolment hands the public key (release/release.pub) to every device it enrols."""
    layout = SiteLayout(site_dir)
    path = layout.release_key
    if path.exists() and not force:
        _fail(
            f"{path} exists: devices pin its public key; --force makes a new one (and "
            "every device must be given the new public key)",
            EXIT_INPUT,
            as_json,
        )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = generate_key()
    save_private_key(path, key)
    public = public_key_to_b64(key.public_key())
    write_atomic(layout.release_pub, public.encode() + b"\n")
    if as_json:
        _print_json({"ok": True, "key_file": str(path), "public_key": public})
        return
    click.echo(f"release key: {path}\npublic key:  {public}")
    click.echo(
        "Set it as [update] release_public_key in device.toml and [updates] "
        "release_public_key in gateway.toml."
    )


@release_group.command("build")
@DIR_OPTION
@click.option("--version", "version", required=True, help="the release's version, e.g. 1.4.0")
@click.option("--min-version", required=True, help="the oldest installed version it may replace")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.argument("wheels", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON for scripts")
def build(
    site_dir: Path,
    version: str,
    min_version: str,
    out: Path,
    wheels: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Sign a bundle of WHEELS (`pip wheel --no-deps .` makes the agent's)."""
    with _errors(as_json):
        manifest = build_bundle(
            list(wheels),
            version=version,
            min_version=min_version,
            signer=_signer(site_dir),
            out=out,
            now_ms=wall_ms(),
        )
    if as_json:
        _print_json({"ok": True, "bundle": str(out), "manifest": manifest.model_dump()})
        return
    click.echo(f"{out}: release {manifest.version} ({len(manifest.files)} wheels), signed")


@release_group.command("add")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@site_dir_option
@gateway_options
def add(bundle: Path, site_dir: Path | None, gateway: GatewayAccess, as_json: bool) -> None:
    """Check BUNDLE (with the site's release key, given --dir) and add it to the gateway."""
    with _errors(as_json):
        if site_dir is not None:
            read_bundle(bundle, _signer(site_dir).public_key)  # a typo fails here, not there
        manifest = gateway.client(site_dir).add_release(bundle.read_bytes())
    if as_json:
        _print_json({"ok": True, **manifest})
        return
    click.echo(f"release {manifest['version']} added to the gateway")


@click.group("rollout")
def rollout_group() -> None:
    """Staged rollouts of a release to a district's devices."""


@rollout_group.command("start")
@click.argument("version")
@click.option("--district", required=True, help="one of Seoul's 25 district codes, e.g. mapo")
@click.option(
    "--percent",
    type=click.FloatRange(0, 100, min_open=True),
    required=True,
    help="share of the district's devices in this step",
)
@site_dir_option
@gateway_options
def start(
    version: str,
    district: str,
    percent: float,
    site_dir: Path | None,
    gateway: GatewayAccess,
    as_json: bool,
) -> None:
    """Offer VERSION to PERCENT of DISTRICT's devices (never during an open incident)."""
    with _errors(as_json):
        summary = gateway.client(site_dir).start_rollout(version, district, percent)
    _show(summary, as_json)


@rollout_group.command("status")
@site_dir_option
@gateway_options
def status(site_dir: Path | None, gateway: GatewayAccess, as_json: bool) -> None:
    """The current rollout, device by device, and the earlier ones."""
    with _errors(as_json):
        answer = gateway.client(site_dir).rollouts()
    if as_json:
        _print_json(answer)
        return
    current = answer.get("current")
    if current is None:
        click.echo("no rollout")
        return
    _show({k: v for k, v in current.items() if k != "devices"}, False)
    for device_id, progress in sorted(current.get("devices", {}).items()):
        reason = f"  {progress['reason']}" if progress.get("reason") else ""
        click.echo(f"  {device_id:24} {progress['state']:10} offers={progress['offers']}{reason}")


@rollout_group.command("resume")
@click.option(
    "--percent",
    type=click.FloatRange(0, 100, min_open=True),
    help="widen it to this share of the district",
)
@site_dir_option
@gateway_options
def resume(
    percent: float | None, site_dir: Path | None, gateway: GatewayAccess, as_json: bool
) -> None:
    """Resume a paused rollout, or widen it to the next step (--percent), done or not."""
    with _errors(as_json):
        summary = gateway.client(site_dir).resume_rollout(percent)
    _show(summary, as_json)


@rollout_group.command("abort")
@site_dir_option
@gateway_options
def abort(site_dir: Path | None, gateway: GatewayAccess, as_json: bool) -> None:
    """Stop offering; devices already updating finish, or roll back, by themselves."""
    with _errors(as_json):
        summary = gateway.client(site_dir).abort_rollout()
    _show(summary, as_json)


def _show(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json({"ok": True, **summary})
        return
    counts = summary.get("counts", {})
    line = " ".join(f"{k}={v}" for k, v in counts.items())
    paused = f" ({summary['paused_because']})" if summary.get("paused_because") else ""
    click.echo(
        f"rollout {summary['id']}: {summary['version']} to {summary['percent']:g}% of "
        f"{summary['district']}, {summary['state']}{paused}" + (f"; {line}" if line else "")
    )
