"""Run Debian's mosquitto as a child process with a config we write.

Tests, `make demo` and the simulator's broker-restart fault all start the same way: a
loopback listener on a free port, optional TLS, optional ACL, persistence in a folder of
our own. Where mosquitto is missing, `embedded_broker` falls back to amqtt (MQTT 3.1.1
only, no shared subscriptions, about 1/7 of mosquitto's speed: fine for a demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ansimi.errors import AnsimiError

log = logging.getLogger(__name__)


class BrokerError(AnsimiError, RuntimeError):
    """The broker could not be started or stopped."""


# Free ports are picked below Linux's ephemeral range (32768-60999). A port the kernel
# picks for a bind to port 0 comes from that range, and between our check and the server's
# bind it can become the source port of some outgoing connection (two gateway instances
# in the crash tests failed to start on it); below the range only another server takes it.
# 10000-19999: the cluster test kit takes its blocks of consecutive ports above that.
_PORTS_FROM, _PORTS_TO = 10_000, 20_000
_ports_given: set[int] = set()  # never the same one twice to this process's servers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` nobody listens on now, for a server of ours to bind."""
    rng = random.SystemRandom()  # not the seeded `random` a test or simulation may own
    for _ in range(1_000):
        port = rng.randrange(_PORTS_FROM, _PORTS_TO)
        if port in _ports_given or not port_free(port, host):
            continue
        _ports_given.add(port)
        return port
    raise BrokerError(f"no free port on {host} between {_PORTS_FROM} and {_PORTS_TO}")


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody has `port` bound on `host` now (TCP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


@dataclass
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True
    use_identity_as_username: bool = True
    crl_file: Path | None = None


@dataclass
class MosquittoConfig:
    """Everything that varies between our brokers; `render()` turns it into a config file."""

    state_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    tls: BrokerTls | None = None
    acl_file: Path | None = None
    allow_anonymous: bool = True
    persistence: bool = True
    autosave_interval_s: int = 60
    max_queued_messages: int = 100_000
    # Started as root, mosquitto drops to this user (its own default: `mosquitto`), which
    # must be able to read its files and write `state_dir`.
    user: str | None = None
    extra_lines: list[str] = field(default_factory=list)

    def render(self) -> str:
        lines = [
            "# written by ansimi; edit the generator, not this file",
            "per_listener_settings false",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.state_dir}/",
            f"autosave_interval {self.autosave_interval_s}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages false",
            # MQTT packets are small and each is waited for: without this, an ack written
            # after a publish waits ~40 ms behind the peer's delayed ACK (bench/gateway.py).
            "set_tcp_nodelay true",
            *([f"user {self.user}"] if self.user else []),
            f"listener {self.port} {self.host}",
        ]
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca_file}",
                f"certfile {self.tls.cert_file}",
                f"keyfile {self.tls.key_file}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
                "use_identity_as_username "
                + ("true" if self.tls.use_identity_as_username else "false"),
            ]
            if self.tls.crl_file is not None:
                lines.append(f"crlfile {self.tls.crl_file}")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        lines += self.extra_lines
        return "\n".join(lines) + "\n"


class Mosquitto:
    """A mosquitto child process. Use as a context manager, or start()/stop()."""

    def __init__(self, config: MosquittoConfig) -> None:
        binary = mosquitto_path()
        if binary is None:
            raise BrokerError(
                "mosquitto is not installed: run `apt-get install -y mosquitto` "
                "(or `make demo`, which installs it where it can)"
            )
        self.binary = binary
        self.config = config
        if config.port == 0:
            config.port = free_port(config.host)
        if config.user is None and os.geteuid() == 0:
            # A broker we start for tests or the demo writes into our own folders, which
            # user `mosquitto` may not be able to enter: keep it running as us.
            config.user = pwd.getpwuid(os.getuid()).pw_name
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_file = config.state_dir / "mosquitto.conf"
        self.log_file = config.state_dir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def port(self) -> int:
        return self.config.port

    def start(self, timeout_s: float = 5.0) -> None:
        self.config_file.write_text(self.config.render())
        log_handle = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config_file)],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_handle.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited at start (code {self.process.returncode}); "
                    f"see {self.log_file}:\n{self.log_tail()}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout_s}s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its ACL file and CRL."""
        if self.process is not None:
            self.process.send_signal(signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like (in-memory queues since the last autosave are lost)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_port(host: str, port: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return
