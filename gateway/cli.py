"""`ansimi gateway ...`"""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ansimi import sdnotify
from ansimi.config import ConfigError, load_config
from gateway.config import GatewayConfig
from protocol.errors import ProtocolError

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/ansimi/gateway.toml")


@click.group()
def gateway() -> None:
    """Run the gateway (intake, store, forward, API)."""


@gateway.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="gateway TOML file",
)
def run(config_path: Path) -> None:
    """Run the gateway until stopped."""
    from gateway.api import ApiTlsError
    from gateway.service import Gateway

    try:
        config = load_config(config_path, GatewayConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        service = Gateway(config, config_path=config_path)
    except (FileNotFoundError, ProtocolError, ApiTlsError) as exc:  # keys, certificates
        raise click.ClickException(f"{config_path}: {exc}") from None
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(
            f"{config_path}: cannot open the database {config.database}: {exc}. Fix: make "
            "its folder writable by the service user, or set `database` to another path"
        ) from None
    asyncio.run(_serve(service))


async def _serve(service: Gateway) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly (a SIGKILL loses nothing either)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await service.run()
    except asyncio.CancelledError:
        sdnotify.notify("STOPPING=1")
        log.info("gateway: stopped")
