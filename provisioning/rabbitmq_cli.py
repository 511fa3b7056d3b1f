"""`ansimi provision rabbitmq`: the RabbitMQ cluster's side of a site (provisioning/rabbitmq.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from provisioning.rabbitmq import (
    AMQP_PORT,
    MQTT_TLS_PORT,
    UPLINK_QUEUE,
    RabbitCtl,
    sync,
    write_rabbitmq_files,
)
from siteca.errors import ProvisioningError
from siteca.site import Site

_DIR = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="the site directory",
)
_QUEUE = click.option(
    "--queue", default=UPLINK_QUEUE, show_default=True, help="the gateways' uplink queue"
)


@click.group("rabbitmq")
def rabbitmq() -> None:
    """The site on a RabbitMQ cluster: rabbitmq.conf, users keyed on the certificate CN."""


@rabbitmq.command("conf")
@_DIR
@click.option("--mqtt-listen", default="0.0.0.0", show_default=True, help="MQTT/TLS address")
@click.option(
    "--mqtt-port", type=click.IntRange(1, 65535), default=MQTT_TLS_PORT, show_default=True
)
@click.option("--amqp-listen", default="127.0.0.1", show_default=True, help="gateways' AMQP")
@click.option("--amqp-port", type=click.IntRange(1, 65535), default=AMQP_PORT, show_default=True)
@click.option("--node", "nodes", multiple=True, help="a cluster node (rabbit@host); repeat")
@_QUEUE
def conf_command(
    directory: Path,
    mqtt_listen: str,
    mqtt_port: int,
    amqp_listen: str,
    amqp_port: int,
    nodes: tuple[str, ...],
    queue: str,
) -> None:
    """Write rabbitmq/{rabbitmq.conf,enabled_plugins,definitions.json} and the gateway's
    AMQP password file (0600) under the site directory."""
    try:
        files = write_rabbitmq_files(
            Site.open(directory),
            queue=queue,
            mqtt_host=mqtt_listen,
            mqtt_port=mqtt_port,
            amqp_host=amqp_listen,
            amqp_port=amqp_port,
            cluster_nodes=nodes,
        )
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from None
    for path in (files.conf, files.plugins, files.definitions, files.gateway_password):
        click.echo(f"wrote {path}")


@rabbitmq.command("sync")
@_DIR
@click.option("--node", required=True, help="a running node of the cluster (rabbit@host)")
@click.option("--rabbitmqctl", "program", default="rabbitmqctl", show_default=True)
@_QUEUE
def sync_command(directory: Path, node: str, program: str, queue: str) -> None:
    """Users and permissions onto a running cluster: every bell and the gateway in; every
    revoked identity (run after `ansimi provision revoke`) and `guest` out, disconnected."""
    try:
        result = sync(Site.open(directory), RabbitCtl(node, program=program), queue=queue)
    except ProvisioningError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps({"users": result.users, "removed": result.removed, "closed": result.closed})
    )
