"""The installer's control socket: `ansimi device press` and `ansimi device status`.

A running agent listens on an AF_UNIX socket in its state folder (`control.sock`, mode
0600, so only the service user and root may use it). One small protocol, JSON lines:
the client sends one request line; the agent answers with one line per event, and for a
press keeps the connection open to tell each ack stage as it comes back.

    {"op": "press", "gesture": "short"}          ->  {"event": "sent", ...} per message
                                                     {"event": "stage", ...} per ack
    {"op": "status"}                             ->  {"event": "status", ...}
    anything else                                ->  {"event": "error", "reason": ...}

A press goes in as the hardware's own input events (`InputEvent`s into the agent's input
sink, the one the buttons feed): the behaviour decides what it means, exactly as for a
finger on the button. Holds are told by their length (`held_for`), as gpiozero tells them,
so a 15 s duress hold takes no 15 s at the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from device.config import BehaviourSection
from device.errors import DeviceError
from device.hal.ports import InputEvent, InputSink
from protocol.messages import Ack, Alert, Cancel, Health

if TYPE_CHECKING:
    from device.agent import Agent

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
# one request line; anything longer is not ours
MAX_REQUEST_BYTES = 1024
# a client that sends nothing is dropped after this long
REQUEST_TIMEOUT_S = 5.0
# how often gpiozero's hold thread ticks `held` in the default config (hold_repeat_s)
HOLD_TICK_S = 1.0

Gesture = Literal["short", "long", "duress", "ring", "cancel", "tamper"]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class PressRequest(_Request):
    op: Literal["press"]
    gesture: Gesture = "short"


class StatusRequest(_Request):
    op: Literal["status"]


Request = Annotated[PressRequest | StatusRequest, Field(discriminator="op")]
REQUEST: TypeAdapter[PressRequest | StatusRequest] = TypeAdapter(Request)


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def _hold(button: Literal["emergency", "doorbell"], seconds: float) -> list[InputEvent]:
    """What the hardware reports for a button held `seconds`: the edge, a `held` tick every
    HOLD_TICK_S while down, the release."""
    events = [InputEvent(button, "pressed")]
    ticks = int(seconds // HOLD_TICK_S)
    events += [InputEvent(button, "held", (n + 1) * HOLD_TICK_S) for n in range(ticks)]
    events.append(InputEvent(button, "released", seconds))
    return events


def gesture_events(gesture: Gesture, rules: BehaviourSection) -> list[InputEvent]:
    """The input events a person makes for each gesture, with this device's hold times."""
    if gesture == "short":
        return _hold("emergency", 0.2)
    if gesture == "long":
        return _hold("emergency", rules.long_press_s)
    if gesture == "cancel":
        return _hold("emergency", rules.cancel_hold_s)
    if gesture == "duress":
        return _hold("emergency", rules.duress_hold_s)
    if gesture == "ring":
        return _hold("doorbell", 0.2)
    # the tamper switch opened and closed again, as an installer lifting the cover does
    return [InputEvent("tamper", "opened"), InputEvent("tamper", "closed")]


def refusal(gesture: Gesture, agent: Agent) -> str | None:
    """Why this gesture means nothing on this device now, said with what to do instead."""
    if gesture == "ring" and agent.config.device.kind != "doorbell":
        return f"--ring needs a doorbell; this device is a {agent.config.device.kind}"
    if gesture in ("cancel", "duress") and agent.behaviour.incident is None:
        return f"--{gesture} acts on an alert in progress: press first (`ansimi device press`)"
    return None


@dataclass
class _Watch:
    """One press's messages, and the queue its client's stage lines go to."""

    ids: set[str] = field(default_factory=set)
    # messages sent while the gesture's events go in are the press's; later ones are not
    collecting: bool = True
    lines: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)


class ControlServer:
    """Serves the control socket for one agent; `async with` it beside `agent.run()`."""

    def __init__(self, agent: Agent, sink: InputSink, path: Path) -> None:
        self.agent = agent
        self.sink = sink  # the agent's input sink: the same one the buttons feed
        self.path = path
        self.refused = 0  # bad requests, counted (there is no metrics endpoint on a device)
        self.last_ack: dict[str, Any] | None = None
        self._watches: list[_Watch] = []
        self._server: asyncio.AbstractServer | None = None
        agent.on_sent.append(self._sent)
        agent.on_ack.append(self._acked)

    async def __aenter__(self) -> ControlServer:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by an agent that was killed: nobody listens on it
        # created 0600 from the start: no moment in which another user could connect
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES
            )
            os.chmod(self.path, 0o600)
        except OSError as exc:
            # the installer's convenience must never stop a bell from running
            log.warning(
                "device %s: no control socket at %s (%s): `ansimi device press` and `status` "
                "will not reach this agent; a shorter `device.state_dir` path (under 100 "
                "characters) that the service user can write fixes it",
                self.agent.device_id,
                self.path,
                exc,
            )
        finally:
            os.umask(old_umask)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.agent.on_sent.remove(self._sent)
        self.agent.on_ack.remove(self._acked)

    @property
    def watching(self) -> int:
        """Presses whose stages are being told to a client now."""
        return len(self._watches)

    # ---- what the agent tells ---------------------------------------------------------

    def _sent(self, message_id: str, body: Alert | Cancel | Health) -> None:
        line = {"event": "sent", "id": message_id, "t_ms": self.agent.now_ms()}
        if isinstance(body, Alert):
            line |= {"type": "alert", "trigger": body.trigger, "urgent": body.urgent}
        else:
            line["type"] = "cancel" if isinstance(body, Cancel) else "health"
        for watch in self._watches:
            if watch.collecting:
                watch.ids.add(message_id)
                watch.lines.put_nowait(line)

    def _acked(self, ack: Ack) -> None:
        line = {"event": "stage", "id": ack.ref, "stage": ack.stage, "t_ms": self.agent.now_ms()}
        self.last_ack = line
        for watch in self._watches:
            if ack.ref in watch.ids:
                watch.lines.put_nowait(line)

    # ---- serving ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    raw = await reader.readline()
                request = REQUEST.validate_json(raw)
            except (ValidationError, ValueError, TimeoutError) as exc:
                # ValueError: a line past the limit (asyncio.LimitOverrunError's builtin)
                self._refuse(writer, _reason(exc))
                return
            if isinstance(request, StatusRequest):
                _write(writer, {"event": "status", **self.status()})
            else:
                await self._press(request.gesture, reader, writer)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the installer's client went away: nothing to tell it any more
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self.refused += 1
        log.warning("device %s: control request refused: %s", self.agent.device_id, reason)
        _write(writer, {"event": "error", "reason": reason})

    async def _press(
        self, gesture: Gesture, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        why_not = refusal(gesture, self.agent)
        if why_not is not None:
            self._refuse(writer, why_not)
            return
        log.info(
            "device %s: test press (%s) from the control socket", self.agent.device_id, gesture
        )
        watch = _Watch()
        self._watches.append(watch)
        try:
            for event in gesture_events(gesture, self.agent.config.behaviour):
                self.sink(event)
            watch.collecting = False
            if watch.lines.empty():
                _write(writer, {"event": "done", "detail": "the gesture sent nothing"})
                return
            # until the client hangs up (it knows which stage it waits for) or says more
            # than its one line: a client gone before the next ack leaves no watch behind
            hung_up = asyncio.ensure_future(reader.read(MAX_REQUEST_BYTES))
            try:
                while not hung_up.done():
                    line = asyncio.ensure_future(watch.lines.get())
                    await asyncio.wait({line, hung_up}, return_when=asyncio.FIRST_COMPLETED)
                    if not line.done():
                        line.cancel()
                        break
                    _write(writer, line.result())
                    await writer.drain()
            finally:
                hung_up.cancel()
        finally:
            self._watches.remove(watch)

    def status(self) -> dict[str, Any]:
        agent = self.agent
        heartbeat = agent.heartbeat()
        secondary = heartbeat.secondary
        return {
            "device": agent.device_id,
            "kind": agent.config.device.kind,
            "link": "up" if agent.link.connected else "down",
            "last_ack": self.last_ack,
            "outbox_depth": heartbeat.outbox_depth,
            "power": heartbeat.power,
            "firmware": heartbeat.firmware,
            "sms": None if secondary is None else secondary.model_dump(mode="json"),
            "incident": None if agent.behaviour.incident is None else agent.behaviour.state.value,
            "t_ms": agent.now_ms(),
        }


def _reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"no request line within {REQUEST_TIMEOUT_S:g} s"
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "request"
        return f"{where}: {first['msg']}"
    return f"request longer than {MAX_REQUEST_BYTES} bytes"


def _write(writer: asyncio.StreamWriter, line: dict[str, Any]) -> None:
    writer.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")


# ---- the client (the CLI's side) ----------------------------------------------------------


class ControlUnavailable(DeviceError, ConnectionError):
    """No agent answers on the control socket; the message says what to check."""


async def request(
    path: Path, body: dict[str, Any], on_line: Callable[[dict[str, Any]], bool]
) -> None:
    """Send one request and hand each answer line to `on_line` until it returns False
    or the agent closes the connection."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except FileNotFoundError:
        raise ControlUnavailable(
            f"no control socket at {path}: is the agent running? (systemctl status "
            "ansimi-device; `ansimi device run` creates it in `device.state_dir`)"
        ) from None
    except PermissionError:
        raise ControlUnavailable(
            f"{path} is the service user's only: run as that user (sudo -u ansimi ...) or root"
        ) from None
    except ConnectionRefusedError:
        raise ControlUnavailable(
            f"nobody listens on {path}: the agent that made it has stopped; start it "
            "(systemctl start ansimi-device)"
        ) from None
    try:
        writer.write(json.dumps(body).encode() + b"\n")
        await writer.drain()
        while line := await reader.readline():
            if not on_line(json.loads(line)):
                return
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
