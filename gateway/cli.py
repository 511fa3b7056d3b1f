"""`ansimi gateway ...`"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

from ansimi import sdnotify
from ansimi.config import ConfigError, load_config
from ansimi.listen import port_taken_in
from gateway.config import GatewayConfig
from gateway.store import Store, StoreError, open_store
from protocol.clock import wall_ms
from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/ansimi/gateway.toml")


@click.group()
def gateway() -> None:
    """Run the gateway (intake, store, forward, API)."""


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="gateway TOML file",
)


@gateway.command()
@_config_option
def run(config_path: Path) -> None:
    """Run the gateway until stopped."""
    from ansimi.privacy import KeyFileError
    from gateway.api import ApiTlsError
    from gateway.service import Gateway

    try:
        config = load_config(config_path, GatewayConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        service = Gateway(config, config_path=config_path)
    except (FileNotFoundError, ProtocolError, ApiTlsError, KeyFileError) as exc:  # keys, certs
        raise click.ClickException(f"{config_path}: {exc}") from None
    except (OSError, StoreError) as exc:
        raise click.ClickException(
            f"{config_path}: cannot open the database {config.store_url}: {exc}. Fix: make "
            "its folder writable by the service user, or set `store` to another path"
        ) from None
    try:
        asyncio.run(_serve(service))
    except Exception as exc:
        # found by the API's task inside the gateway's task group: one line, not a traceback
        taken = port_taken_in(exc)
        if taken is None:
            raise
        raise click.ClickException(f"{config_path}: {taken}") from None


async def _serve(service: Gateway) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (a SIGKILL loses nothing either)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    ready = asyncio.create_task(service.ready.wait(), name="gc once ready")
    ready.add_done_callback(_settle_gc_once_started)
    try:
        await service.run()
    except asyncio.CancelledError:
        sdnotify.notify("STOPPING=1")
        log.info("gateway: stopped")
    finally:
        ready.cancel()


def _settle_gc_once_started(ready: asyncio.Task[bool]) -> None:
    from gateway.service import settle_gc

    if not ready.cancelled():
        settle_gc()


def _config_or_exit(config_path: Path) -> GatewayConfig:
    try:
        return load_config(config_path, GatewayConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


T = TypeVar("T")


def _with_store(config: GatewayConfig, use: Callable[[Store], Awaitable[T]]) -> T:
    """Open the gateway's store for one command's work, and close it again."""

    async def run() -> T:
        store = open_store(config.store_url, password_file=config.store_password_file)
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


@gateway.group("privacy-key")
def privacy_key() -> None:
    """The data key sealing devices' personal data ([privacy] key_file)."""


@privacy_key.command("init")
@_config_option
def privacy_key_init(config_path: Path) -> None:
    """Make the site's data key (mode 0600); refuses to replace an existing one."""
    from ansimi.privacy import PrivacyError, create_key_file

    config = _config_or_exit(config_path)
    try:
        keyring = create_key_file(config.privacy.key_file)
    except (PrivacyError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"data key {keyring.current.kid} written to {config.privacy.key_file} (mode 600)")


@privacy_key.command("rotate")
@_config_option
def privacy_key_rotate(config_path: Path) -> None:
    """Make a new data key and re-seal every device's personal data with it.

    Run it with the gateway stopped, or on one instance: the others keep the old key in
    memory until restarted, and could not open data re-sealed meanwhile.
    """
    from ansimi.privacy import PrivacyError, rotate
    from gateway.private import Vault
    from gateway.video.encrypted import RecordingBroken, rewrap_all

    config = _config_or_exit(config_path)
    try:
        kid, count = rotate(
            config.privacy.key_file,
            # recordings keep their chunks: only each one's wrapped content key changes
            lambda keyring: (
                _with_store(config, lambda store: Vault(store, None).reseal(keyring))
                + rewrap_all(config.video.recordings_dir, keyring)
            ),
            credential=config.privacy.credential,
        )
    except (PrivacyError, OSError, StoreError, RecordingBroken) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"data key {kid} now seals {count} device record(s) and recording(s); "
        "the old key is retired"
    )


@gateway.command()
@_config_option
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    help="closed longer ago than this [default: privacy.closed_events_days]",
)
@click.option("--dry-run", is_flag=True, help="count what would go; delete nothing")
def purge(config_path: Path, days: float | None, dry_run: bool) -> None:
    """Delete events closed more than N days ago, and recordings past [video] retention_days.

    Open alerts are never purged; recordings on legal hold are kept.
    """
    import time

    from gateway.video.retention import sweep

    config = _config_or_exit(config_path)
    verb = "would delete" if dry_run else "deleted"
    keep_days = config.privacy.closed_events_days if days is None else days
    if keep_days == 0:
        click.echo("privacy.closed_events_days is 0: events are kept forever; no event purged")
    else:
        cutoff_ms = wall_ms() - int(keep_days * 86_400_000)
        try:
            count = _with_store(
                config, lambda store: store.purge_closed(cutoff_ms, dry_run=dry_run)
            )
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{verb} {count} event(s) closed more than {keep_days:g} day(s) ago")
    video = config.video
    files = sweep(video.recordings_dir, video.retention_days, time.time(), dry_run=dry_run)
    click.echo(
        f"{verb} {len(files)} recording file(s) older than {video.retention_days:g} day(s)"
        " (held recordings are kept)"
    )


@gateway.command()
@_config_option
@click.option("--month", required=True, help="the calendar month, YYYY-MM")
@click.option(
    "--format", "form", type=click.Choice(["csv", "html"]), default="csv", show_default=True
)
@click.option(
    "--timezone", default="Asia/Seoul", show_default=True, help="where the month begins and ends"
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="[default: stdout]")
def report(config_path: Path, month: str, form: str, timezone: str, out: Path | None) -> None:
    """The month's test presses per district: transmission time percentiles and availability
    (gateway/report.py says how each is counted)."""
    from zoneinfo import ZoneInfoNotFoundError

    from gateway.report import BadMonth, month_bounds, monthly_rows, to_csv, to_html

    config = _config_or_exit(config_path)
    try:
        start_ms, end_ms = month_bounds(month, timezone)
    except (BadMonth, ZoneInfoNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        records = _with_store(config, lambda store: store.test_records(start_ms, end_ms))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    rows = monthly_rows(records)
    text = to_csv(rows) if form == "csv" else to_html(rows, month, config.id)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"{len(rows)} district(s) written to {out}")


@gateway.command()
@click.argument("recording", type=click.Path(path_type=Path))
@click.option("--by", required=True, help="who orders the hold (case or officer reference)")
@click.option("--reason", required=True, help="why it must be kept")
def hold(recording: Path, by: str, reason: str) -> None:
    """Put a sealed recording on legal hold: retention keeps it until released."""
    from gateway.video.retention import HoldError, place_hold

    try:
        held = place_hold(recording, by=by, reason=reason)
    except HoldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"on hold: {recording} ({held.name})")


@gateway.command()
@click.argument("recording", type=click.Path(path_type=Path))
def release(recording: Path) -> None:
    """Release a recording's legal hold; retention applies to it again."""
    from gateway.video.retention import HoldError, release_hold

    try:
        release_hold(recording)
    except HoldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"released: {recording}")


@gateway.command("export-evidence")
@click.argument("event_id")
@_config_option
@click.option("--operator", required=True, help="who exports (audited)")
@click.option("--reason", required=True, help="why, e.g. the police case number (audited)")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="new folder for the export (must not exist)",
)
def export_evidence(
    event_id: str, config_path: Path, operator: str, reason: str, out: Path
) -> None:
    """Export an event's doorbell recordings for the police, with a verification anyone can run.

    EVENT_ID is the alert's id (the incident's first alert). The folder gets the playable
    recordings, evidence.json signed by the gateway, its public key and VERIFY.txt with the
    openssl and ffprobe commands that check them. The export is audited.
    """
    from ansimi.privacy import PrivacyError, load_keyring
    from gateway.private import INIT
    from gateway.video.audit import AuditError
    from gateway.video.encrypted import RecordingBroken
    from gateway.video.export import ExportError
    from gateway.video.export import export_evidence as export
    from protocol.keys import load_private_key

    config = _config_or_exit(config_path)
    try:
        event = _with_store(config, lambda store: store.event(event_id))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if event is None:
        raise click.ClickException(f"no event {event_id} in {config.store_url}")
    try:
        keyring = load_keyring(
            config.privacy.key_file, credential=config.privacy.credential, init_hint=INIT
        )
        key = load_private_key(config.signing_key, hint="set signing_key in the gateway config")
        done = export(
            event={
                "id": event.event_id,
                "device": event.device_id,
                "type": event.type,
                "ts_ms": event.ts_ms,
            },
            root=config.video.recordings_dir,
            out=out,
            keyring=keyring,
            key=key,
            kid=config.id,
            operator=operator,
            reason=reason,
        )
    except (ExportError, AuditError, RecordingBroken, PrivacyError, ProtocolError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported to {done}; check it with the commands in {done / 'VERIFY.txt'}")
