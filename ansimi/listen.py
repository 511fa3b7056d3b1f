"""Listening on a port, and saying which port and what to do when another program has it.

The gateway's API, the console and the demo all bind a TCP port an installer chose; a port
already taken must stop start-up with the port, the program that finds out (`ss`) and the
setting that moves it, never a traceback or a URL that leads to someone else's server.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterator

from aiohttp import web

from ansimi.errors import AnsimiError


class PortTaken(AnsimiError, OSError):
    """`port` on `host` is held by another program; `fix` says how to choose another."""

    def __init__(self, what: str, host: str, port: int, reason: str, fix: str) -> None:
        self.host = host
        self.port = port
        super().__init__(
            f"{what}: port {port} on {host} is taken ({reason}): stop the program that "
            f"listens there (`ss -ltnp 'sport = :{port}'` names it), or {fix}"
        )


def check_free(what: str, host: str, port: int, fix: str) -> None:
    """Raise PortTaken when `port` cannot be bound now. SO_REUSEADDR as aiohttp binds: a
    port left in TIME_WAIT by a stopped server is not taken."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortTaken(what, host, port, os.strerror(exc.errno), fix) from None


async def start_site(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    what: str,
    fix: str,
) -> int:
    """Start serving `runner` on host:port; the port bound (the real one for 0)."""
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        # asyncio's own text repeats the address: the system's reason is enough
        raise PortTaken(what, host, port, os.strerror(exc.errno), fix) from None
    return int(runner.addresses[0][1])


def port_taken_in(error: BaseException) -> PortTaken | None:
    """The PortTaken inside `error` (a task group's ExceptionGroup, at any depth), if any."""
    for found in _leaves(error):
        if isinstance(found, PortTaken):
            return found
    return None


def _leaves(error: BaseException) -> Iterator[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error
