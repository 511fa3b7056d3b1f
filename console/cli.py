"""`ansimi console`: the control centre's receiver (the live page grows here)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import click
from aiohttp import web

from console.receiver import EventLog, ReceivedEvent, Receiver


def _print_event(event: ReceivedEvent) -> None:
    detail = event.body.get("trigger", "")
    click.echo(
        f"[centre] {event.type:<9} {detail:<13} device={event.device_id} "
        f"district={event.district or '-'} id={event.event_id}",
    )


async def _serve(host: str, port: int, receiver: Receiver) -> None:
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    click.echo(f"[centre] receiving events at http://{host}:{port}/events")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


@click.command()
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT")
@click.option(
    "--db", type=click.Path(path_type=Path), default=Path("console.db"), show_default=True
)
@click.option(
    "--secret-env",
    default="ANSIMI_CENTRE_SECRET",
    show_default=True,
    help="environment variable holding the HMAC secret shared with the gateway",
)
@click.option("--print/--no-print", "print_events", default=True, help="print each new event")
def console(listen: str, db: Path, secret_env: str, print_events: bool) -> None:
    """Run the control-centre receiver."""
    secret = os.environ.get(secret_env, "")
    if len(secret) < 16:
        raise click.ClickException(
            f"${secret_env} must hold the centre's HMAC secret (16+ characters), the same "
            "value as the gateway's [[centres]] secret for this centre"
        )
    host, _, port = listen.rpartition(":")
    receiver = Receiver(secret, EventLog(db))
    if print_events:
        receiver.listeners.append(_print_event)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(host or "127.0.0.1", int(port), receiver))
