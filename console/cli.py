"""`ansimi console`: the control centre's receiver and live page; `add-operator`.

    ansimi console --listen 127.0.0.1:8080 --db console.db \\
        --gateway http://127.0.0.1:8480 --gateway-key gw-1=BASE64KEY
    ansimi console add-operator kim --db console.db      (password from a prompt or
                                                          $ANSIMI_OPERATOR_PASSWORD)

Secrets come from the environment, never the command line (which `ps` shows):
$ANSIMI_CENTRE_SECRET (the HMAC shared with the gateway's [[centres]] entry) and
$ANSIMI_CONSOLE_GATEWAY_TOKEN (an operator token of the gateway's [[api.tokens]]).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import click
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.httpguard import READ_TIMEOUT_S
from ansimi.listen import PortTaken, start_site
from console.directory import Directory
from console.gateway_client import GatewayClient
from console.operators import OperatorError, Operators
from console.receiver import EventLog, ReceivedEvent, Receiver
from console.web import ConsoleApp
from protocol.errors import Malformed
from protocol.keys import public_key_from_b64


def _print_event(event: ReceivedEvent) -> None:
    detail = event.body.get("trigger", "") or event.body.get("state", "")
    click.echo(
        f"[centre] {event.type:<9} {detail:<13} device={event.device_id} "
        f"district={event.district or '-'} id={event.event_id}",
    )


async def _serve(
    host: str,
    port: int,
    console: ConsoleApp,
    tls: ssl.SSLContext | None,
) -> None:
    runner = web.AppRunner(console.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    await start_site(
        runner,
        host,
        port,
        ssl_context=tls,
        what="the console",
        fix="choose another with --listen HOST:PORT (and the gateway's [[centres]] url with it)",
    )
    scheme = "https" if tls else "http"
    click.echo(f"[centre] receiving events at {scheme}://{host}:{port}/events")
    click.echo(f"[centre] console page at {scheme}://{host}:{port}/")
    directory = console.directory
    try:
        async with asyncio.TaskGroup() as tasks:
            if directory is not None:
                tasks.create_task(directory.run(), name="registry-sync")
            await console.guard.watch(runner)
    finally:
        await runner.cleanup()
        if console.gateway is not None:
            await console.gateway.close()


def _gateway_keys(pairs: tuple[str, ...]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for pair in pairs:
        kid, sep, b64 = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"{pair!r}: write GATEWAY_ID=BASE64_PUBLIC_KEY")
        try:
            keys[kid] = public_key_from_b64(b64)
        except Malformed as exc:
            raise click.BadParameter(f"{kid}: {exc}") from None
    return keys


@click.group(invoke_without_command=True)
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
@click.option(
    "--gateway",
    "gateway_url",
    default="",
    help="the gateway API's base URL (registry, operator actions, WHEP), e.g. "
    "http://127.0.0.1:8480; without it only the HMAC is checked and actions are off",
)
@click.option(
    "--gateway-token-env",
    default="ANSIMI_CONSOLE_GATEWAY_TOKEN",
    show_default=True,
    help="environment variable holding the console's operator token for the gateway API",
)
@click.option(
    "--gateway-key",
    "gateway_key_pairs",
    multiple=True,
    metavar="ID=KEY",
    help="a gateway's public key (base64url), for the status events it signs; repeatable",
)
@click.option(
    "--gateway-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="the site CA that signed the gateway API's certificate (for an https --gateway)",
)
@click.option(
    "--tile-url",
    default="",
    help="the map's tile server, e.g. https://tiles.example.org/{z}/{x}/{y}.png (a city's "
    "own); empty: the map shows Seoul's district outlines, shipped with the console",
)
@click.option("--sync-every", default=30.0, show_default=True, help="registry sync, seconds")
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path), default=None)
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path), default=None)
@click.option(
    "--secure-cookie/--no-secure-cookie",
    default=None,
    help="mark the session cookie Secure (default: on with --tls-cert; set it behind a "
    "TLS-terminating proxy)",
)
@click.option(
    "--read-timeout",
    "read_timeout_s",
    default=READ_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0.1, max=300),
    help="seconds a client has to send a request's head, and its body (slow clients)",
)
@click.option("--print/--no-print", "print_events", default=True, help="print each new event")
@click.pass_context
def console(
    ctx: click.Context,
    listen: str,
    db: Path,
    secret_env: str,
    gateway_url: str,
    gateway_token_env: str,
    gateway_key_pairs: tuple[str, ...],
    gateway_ca: Path | None,
    tile_url: str,
    sync_every: float,
    tls_cert: Path | None,
    tls_key: Path | None,
    secure_cookie: bool | None,
    read_timeout_s: float,
    print_events: bool,
) -> None:
    """Run the control-centre console: the gateway's webhook and the operators' page."""
    if ctx.invoked_subcommand is not None:
        return
    secret = os.environ.get(secret_env, "")
    if len(secret) < 16:
        raise click.ClickException(
            f"${secret_env} must hold the centre's HMAC secret (16+ characters), the same "
            "value as the gateway's [[centres]] secret for this centre"
        )
    check_tile_url(tile_url)
    gateway: GatewayClient | None = None
    directory: Directory | None = None
    keys = _gateway_keys(gateway_key_pairs)
    if gateway_url:
        token = os.environ.get(gateway_token_env, "")
        if len(token) < 16:
            raise click.ClickException(
                f"--gateway is set, so ${gateway_token_env} must hold an operator token of "
                "the gateway's [[api.tokens]] (16+ characters)"
            )
        gateway = GatewayClient(gateway_url, token, ca_file=gateway_ca)
        directory = Directory(
            db,
            gateway.devices,
            gateway_keys=keys,
            every_s=sync_every,
        )
    tls: ssl.SSLContext | None = None
    if tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(tls_cert, tls_key)
    host, _, port = listen.rpartition(":")
    receiver = Receiver(secret, EventLog(db), directory=directory)
    if print_events:
        receiver.listeners.append(_print_event)
    app = ConsoleApp(
        receiver,
        Operators(db),
        directory=directory,
        gateway=gateway,
        secure_cookie=secure_cookie if secure_cookie is not None else tls is not None,
        read_timeout_s=read_timeout_s,
        tile_url=tile_url,
    )
    if not app.operators.names():
        click.echo(
            f"[centre] no operators yet: `ansimi console add-operator NAME --db {db}`", err=True
        )
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(_serve(host or "127.0.0.1", int(port), app, tls))
        except PortTaken as exc:
            raise click.ClickException(str(exc)) from None


def check_tile_url(tile_url: str) -> None:
    """A tile URL the map can use, or a ClickException naming the option and the fix."""
    if not tile_url:
        return
    parts = urlsplit(tile_url)
    missing = [p for p in ("{z}", "{x}", "{y}") if p not in tile_url]
    if parts.scheme not in ("http", "https") or not parts.netloc or missing:
        raise click.ClickException(
            f"--tile-url {tile_url!r} is not a tile template: give an http(s) URL with "
            "{z}, {x} and {y}, e.g. https://tiles.example.org/{z}/{x}/{y}.png, or leave it "
            "empty for the district outlines"
        )


@console.command("add-operator")
@click.argument("name")
@click.option(
    "--db", type=click.Path(path_type=Path), default=Path("console.db"), show_default=True
)
@click.option(
    "--password-env",
    default="ANSIMI_OPERATOR_PASSWORD",
    show_default=True,
    help="take the password from this environment variable instead of a prompt",
)
@click.option(
    "--district",
    "districts",
    multiple=True,
    default=("*",),
    show_default=True,
    help="a district this operator serves (repeat for several); * is all (a central desk)",
)
def add_operator(name: str, db: Path, password_env: str, districts: tuple[str, ...]) -> None:
    """Create an operator account (password: prompt, or $ANSIMI_OPERATOR_PASSWORD)."""
    password = os.environ.get(password_env) or click.prompt(
        f"password for {name}", hide_input=True, confirmation_prompt=True
    )
    operators = Operators(db)
    try:
        operators.add(name, password, districts)
    except OperatorError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        operators.close()
    click.echo(f"operator {name} ({', '.join(districts)}) added to {db}")
