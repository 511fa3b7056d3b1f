"""What every HTTP server of ours facing the network needs: ids in paths checked against
their grammar, and slow clients closed.

Ids: every path parameter of every route must have a grammar in `protocol/ids.py`
(`check_app_routes` refuses an app with one that has not), and `bad_request_id` tells a
server's middleware which parameter of a request breaks its grammar, before any handler
puts it in a URL, a file name or SQL.

Slow clients: aiohttp waits forever for the rest of a request's head, or of its body. A
client that sends `GET / HTTP/1.1\\r\\nHost:` and nothing more holds a connection (a file
descriptor, memory) for good; a few hundred of them starve the server. `SlowClientGuard`
closes a connection whose request head has not been read within `timeout_s` of the
connection opening (or of the previous response, on a kept-alive connection), or whose
body has not been read to its end within `timeout_s` of its head. A long answer (a server-
sent event stream, a large download to a slow reader) is not limited: the client sent all
it had to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from protocol.errors import Malformed
from protocol.ids import PATH_ID_GRAMMARS, check_path_id, unchecked_path_params

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
READ_TIMEOUT_S = 10.0
SWEEP_EVERY_S = 0.5


def route_params(resource: web.AbstractResource) -> list[str]:
    """The names of a resource's path parameters (`/alerts/{event_id}` -> event_id)."""
    pattern = resource.get_info().get("pattern")
    return list(pattern.groupindex) if pattern is not None else []


def route_template(request: web.Request) -> str:
    """The template of the route a request matched (`/api/whep/{device_id}`): for logs and
    the audit, where the raw path is the attacker's text."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "?"


def check_app_routes(app: web.Application, also: Iterable[str] = ()) -> None:
    """Refuse an app with a path parameter no id grammar covers (a programming error)."""
    for resource in app.router.resources():
        unchecked = unchecked_path_params(route_params(resource), also)
        if unchecked:
            raise ValueError(
                f"route {resource.canonical}: path parameters {', '.join(unchecked)} have no "
                "grammar: name them after an id of protocol/ids.py PATH_ID_GRAMMARS"
            )


def bad_request_id(request: web.Request) -> str | None:
    """Why one of the request's ids breaks its grammar; None when all are valid.

    The ids are the path parameters named after a grammar (`check_app_routes` has made
    sure, at start, that a route has no others but the server's own words, such as a
    stage name, which it checks itself; a static file's name is aiohttp's to check), and
    the query parameters named so (`?device_id=`): those reach SQL as surely.
    """
    ids = [*request.match_info.items(), *request.query.items()]
    for name, value in ids:
        if name not in PATH_ID_GRAMMARS:
            continue
        try:
            check_path_id(name, value)
        except Malformed as exc:
            return str(exc)
    return None


def _still_sending(connection: RequestHandler) -> bool:
    transport = connection.transport
    return transport is not None and transport.get_write_buffer_size() > 0


@dataclass(slots=True)
class _Open:
    since: float  # when the connection opened or last finished a request
    request: web.Request | None = None  # the request being handled, if any
    started: float = 0.0
    served: bool = False  # it has had an answer: a wait for the next head is keep-alive


class SlowClientGuard:
    """Closes connections that send their request too slowly; see the module's docstring.

    Its `middleware` marks which connections are in a request; `sweep()` closes the
    overdue ones (the clock is an argument, so tests need no sleep); `watch()` sweeps a
    running server every `SWEEP_EVERY_S`.
    """

    def __init__(
        self,
        timeout_s: float = READ_TIMEOUT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[str], None] = lambda _why: None,
    ) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._on_close = on_close  # a metric's increment, given the reason
        # RequestHandler has __slots__ and no weak references: `sweep` forgets the
        # connections that have gone
        self._open: dict[RequestHandler, _Open] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        state = self._open.get(protocol)
        if state is None:
            state = self._open[protocol] = _Open(self._clock())
        state.request, state.started = request, self._clock()
        try:
            return await handler(request)
        finally:
            state.request, state.since, state.served = None, self._clock(), True

    def sweep(self, connections: Iterable[RequestHandler]) -> int:
        """Close every connection overdue with its request's head or body; how many."""
        now = self._clock()
        closed = 0
        connections = list(connections)
        for gone in self._open.keys() - set(connections):
            del self._open[gone]
        for connection in connections:
            state = self._open.setdefault(connection, _Open(now))
            request = state.request
            if request is None and _still_sending(connection):
                # the handler is done but its answer is still going out to a slow reader
                # (a large download): the next request's head is not due before it has
                state.since = now
                continue
            if request is None:
                overdue = now - state.since > self.timeout_s
                why = "idle" if state.served else "head"
            else:
                body_done = request.content.is_eof()
                overdue, why = not body_done and now - state.started > self.timeout_s, "body"
            if overdue:
                if why == "idle":
                    # a kept-alive connection its client no longer uses: closed, not counted
                    # as a slow client (every client pool leaves some)
                    log.debug("http: closed an idle kept-alive connection")
                else:
                    # no address in the log: it is personal data
                    log.info("http: closed a connection: request %s too slow", why)
                    self._on_close(why)
                connection.force_close()
                self._open.pop(connection, None)
                closed += 1
        return closed

    async def watch(self, runner: web.BaseRunner) -> None:
        """Sweep the runner's server until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            if runner.server is not None:
                self.sweep(runner.server.connections)
