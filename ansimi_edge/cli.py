"""`ansimi`: one command, a subcommand per part, each imported only when used.

Composition: the top layer, the one place that may import every part."""

from __future__ import annotations

from pathlib import Path

import click

from ansimi.lazygroup import LazyGroup
from ansimi.logs import configure
from provisioning.identity import DEVICE_IDENTITY_LOADER, DeviceIdentity

# subcommand -> "module:attribute" of a click command or group
PARTS: dict[str, tuple[str, str]] = {
    "device": ("device.cli:device", "run, enrol and test a device agent"),
    "gateway": ("gateway.cli:gateway", "run the gateway (intake, store, forward, API)"),
    "provision": ("provisioning.cli:provision", "installer's tools: site CA, devices, ACLs"),
    "sim": ("simulator.cli:sim", "run simulated fleets and scenarios"),
    "console": ("console.cli:console", "run the control-centre console"),
    "demo": (
        "ansimi_edge.demo:demo",
        "broker, gateway, receiver and a simulated fleet on one machine",
    ),
}


def load_device_identity(path: Path) -> DeviceIdentity:
    """The device's own config loader, handed to provisioning (`provision device check
    --device-config`), which may not import the device."""
    from ansimi.config import load_config
    from device.config import DeviceConfig

    config = load_config(path, DeviceConfig)
    mqtt = config.mqtt
    return DeviceIdentity(
        device_id=config.device.id,
        key_file=config.device.key_file,
        broker=(mqtt.host, mqtt.port),
        ca_file=mqtt.ca_file,
        cert_file=mqtt.cert_file,
        tls_key_file=mqtt.key_file or config.device.key_file,
    )


@click.group(cls=LazyGroup, lazy=PARTS)
@click.option(
    "-v", "--verbose", count=True, help="-v: the agent's decisions too; -vv: debug (ansimi/logs.py)"
)
@click.option(
    "--debug-log",
    "debug_loggers",
    multiple=True,
    metavar="LOGGER",
    help="debug output of one logger, e.g. ansimi.webrtc.wire for RTP/ICE/SDP detail",
)
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug_loggers: tuple[str, ...]) -> None:
    """Ansimi Edge: emergency bells, doorbells and store bells to control centres."""
    ctx.meta[DEVICE_IDENTITY_LOADER] = load_device_identity
    configure(verbose, debug_loggers)


def main() -> None:
    cli()
