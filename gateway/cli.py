"""`ansimi gateway ...`"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from ansimi.config import ConfigError, load_config
from gateway.config import GatewayConfig

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
    from gateway.service import Gateway

    try:
        config = load_config(config_path, GatewayConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        service = Gateway(config, config_path=config_path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    asyncio.run(service.run())
