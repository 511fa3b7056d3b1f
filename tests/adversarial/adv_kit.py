"""A whole site to attack, built once per test module with real parts only.

A real mosquitto, the real gateway (`python -m ansimi_edge gateway run`), the real console
(`python -m ansimi_edge console`), two devices in two districts whose alerts are signed with
their own keys and published with the stock `mosquitto_pub`, as an outsider would. Tokens:
a central one (all districts, the console's), one per district desk, an admin of all
districts and one of mapo only. Console
operators: `kim` (all districts) and `mapo-lee` (mapo only).

Everything here is synchronous (subprocesses and blocking HTTP), so a module-scoped
fixture can build it once; the tests are plain functions with bounded waits.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansimi.broker import Mosquitto, MosquittoConfig, free_port
from console.operators import Operators
from gateway.store import Device, SqliteDatabase
from protocol.clock import wall_ms
from protocol.envelope import seal
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64, save_private_key
from protocol.messages import Alert, build_message

SECRET = "centre-secret-for-adversarial-tests"
PASSWORD = "a long operator password"
TOKENS = {  # name -> (role, districts, token)
    "central": ("operator", ["*"], "central-token-for-adversarial"),
    "mapo-desk": ("operator", ["mapo"], "mapo-desk-token-for-adversarial"),
    "gangnam-desk": ("operator", ["gangnam"], "gangnam-desk-token-adversarial"),
    "admin": ("admin", ["*"], "admin-token-for-adversarial-tests"),
    "mapo-admin": ("admin", ["mapo"], "mapo-admin-token-for-adversarial"),
}
MAPO_BELL = "bell-mapo-01"
GANGNAM_DOOR = "door-gangnam-01"
READ_TIMEOUT_S = 2.0  # the gateway's and the console's, short so slow-client tests are quick
WAIT_S = 60.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def call(
    port: int,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Answer:
    """One HTTP request on a fresh connection; `path` is sent exactly as given (raw)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            data = _read_for(response, 1.0)
        else:
            data = response.read()
        return Answer(response.status, dict(response.getheaders()), data)
    finally:
        connection.close()


def _read_for(response: http.client.HTTPResponse, seconds: float) -> bytes:
    """What an endless stream sends within `seconds`."""
    assert response.fp is not None
    raw = response.fp.raw  # type: ignore[attr-defined]
    raw._sock.settimeout(seconds)  # the stream never ends by itself
    chunks = []
    with contextlib.suppress(TimeoutError, OSError):
        while chunk := response.read1(4096):  # type: ignore[attr-defined]
            chunks.append(chunk)
    return b"".join(chunks)


def until(check: Any, what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError):
            found = check()
            if found:
                return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Site:
    root: Path
    broker: Mosquitto
    gateway_port: int
    console_port: int
    alerts: dict[str, str]  # device id -> its alert's event id
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _seq: int = 1

    def gw(self, method: str, path: str, who: str | None = "central", **kw: Any) -> Answer:
        token = TOKENS[who][2] if who is not None else None
        return call(self.gateway_port, method, path, token=token, **kw)

    def state_of(self, event_id: str) -> str:
        return str(self.gw("GET", f"/alerts/{event_id}").json()["state"])

    def sign_in(self, name: str) -> tuple[str, str]:
        """(cookie header, CSRF token) of a console session."""
        answer = call(
            self.console_port,
            "POST",
            "/api/login",
            body=json.dumps({"name": name, "password": PASSWORD}).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert answer.status == 200, answer.text
        cookie = answer.headers["Set-Cookie"].split(";")[0]
        return cookie, str(answer.json()["csrf"])

    def console(self, method: str, path: str, session: tuple[str, str] | None, **kw: Any) -> Answer:
        headers = dict(kw.pop("headers", {}))
        if session is not None:
            headers["Cookie"] = session[0]
            headers["X-CSRF-Token"] = session[1]
        return call(self.console_port, method, path, headers=headers, **kw)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def _alert(root: Path, broker: Mosquitto, device_id: str, signer: Signer) -> str:
    message = build_message(
        Alert(bell="emergency", trigger="press"),
        device=device_id,
        seq=1,
        ts=wall_ms(),
    )
    payload = root / f"{device_id}.jws"
    payload.write_text(seal(message, signer))
    subprocess.run(
        ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1",
         "-t", f"ansimi/v1/{device_id}/up/alert", "-f", str(payload)],
        check=True, timeout=10,
    )  # fmt: skip
    return message.id


def _gateway_toml(root: Path, broker: Mosquitto, api_port: int, console_port: int) -> Path:
    tokens = "".join(
        f'[[api.tokens]]\nname = "{name}"\nrole = "{role}"\n'
        f'districts = {json.dumps(districts)}\ntoken = "{token}"\n'
        for name, (role, districts, token) in TOKENS.items()
    )
    path = root / "gateway.toml"
    path.write_text(
        f"""id = "gw-adv"
signing_key = "{root}/gateway/signing.key"
database = "{root}/gateway/gateway.db"
[mqtt]
host = "{broker.host}"
port = {broker.port}
[forward]
backoff_min_s = 0.1
backoff_max_s = 1.0
[api]
enabled = true
port = {api_port}
read_timeout_s = {READ_TIMEOUT_S}
{tokens}
[updates]
release_public_key = "{public_key_to_b64(generate_key().public_key())}"
dir = "{root}/gateway/releases"
public_url = "https://127.0.0.1:{api_port}"
[[centres]]
name = "central"
url = "http://127.0.0.1:{console_port}/events"
secret = "{SECRET}"
"""
    )
    return path


def _spawn(root: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (root / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "ansimi_edge", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )


@contextlib.contextmanager
def attacked_site(root: Path) -> Iterator[Site]:
    broker = Mosquitto(MosquittoConfig(state_dir=root / "broker"))
    broker.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        (root / "gateway").mkdir(parents=True)
        gateway_key = generate_key()
        save_private_key(root / "gateway" / "signing.key", gateway_key)
        store = SqliteDatabase(root / "gateway" / "gateway.db")
        signers = {}
        for device_id, kind, district in (
            (MAPO_BELL, "bell", "mapo"),
            (GANGNAM_DOOR, "doorbell", "gangnam"),
        ):
            key = generate_key()
            signers[device_id] = Signer(device_id, key)
            public = public_key_to_b64(key.public_key())
            store.add_device(Device(device_id, public, kind, district), now_ms=0)  # type: ignore[arg-type]
        store.close()
        operators = Operators(root / "console.db")
        operators.add("kim", PASSWORD)
        operators.add("mapo-lee", PASSWORD, ["mapo"])
        operators.close()
        api_port, console_port = free_port(), free_port()
        config = _gateway_toml(root, broker, api_port, console_port)
        processes.append(
            _spawn(
                root,
                "console",
                [
                    "console",
                    "--listen",
                    f"127.0.0.1:{console_port}",
                    "--db",
                    str(root / "console.db"),
                    "--gateway",
                    f"http://127.0.0.1:{api_port}",
                    "--sync-every",
                    "1",
                    "--read-timeout",
                    str(READ_TIMEOUT_S),
                    "--no-print",
                ],
                {
                    "ANSIMI_CENTRE_SECRET": SECRET,
                    "ANSIMI_CONSOLE_GATEWAY_TOKEN": TOKENS["central"][2],
                },
            )
        )
        processes.append(_spawn(root, "gateway", ["gateway", "run", "--config", str(config)], {}))
        site = Site(root, broker, api_port, console_port, {}, processes)
        until(lambda: site.gw("GET", "/healthz", None).status == 200, "the gateway")
        for device_id, signer in signers.items():
            site.alerts[device_id] = _alert(root, broker, device_id, signer)
        kim = until(lambda: site.sign_in("kim"), "the console")
        until(
            lambda: len(site.console("GET", "/api/alerts", kim).json()["alerts"]) == 2,
            "both alerts at the console",
        )
        yield site
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        broker.stop()


def half_sent(port: int, data: bytes) -> socket.socket:
    """A raw client that sends `data` (part of a request) and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def closed_within(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes `sock`; AssertionError past `limit_s`."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return time.monotonic() - started
    except TimeoutError:
        raise AssertionError(f"the server kept a slow client past {limit_s} s") from None
    except ConnectionResetError:
        return time.monotonic() - started
    finally:
        sock.close()
