"""Hosts made of network namespaces on one bridge: the multi-host tests' machine room.

Each host is a namespace with one veth cable into a bridge in the test's own namespace,
which has the subnet's first address (the street the bells and the centre are on). The
subnet is a free 10.x.y.0/24, the names carry a random suffix, and everything is removed on
the way out, after a failure too: every process in a namespace is killed, then the
namespace is deleted (its veth end with it), then the bridge. Needs root (`ip netns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from pg_testkit import SUPERUSER, PgServer, _as_postgres


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def need_netns() -> None:
    if os.getuid() != 0:
        pytest.skip("network namespaces need root (`ip netns add`)")


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str
    cable: str  # the veth end in the bridge: down is this host's cable pulled

    def argv(self, *command: str | Path) -> list[str]:
        """`command` run on this host (in its namespace)."""
        return ["ip", "netns", "exec", self.netns, *(str(c) for c in command)]

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.netns).split()]

    def kill_all(self) -> None:
        """SIGKILL of every process on the host, as when it loses power."""
        for _ in range(20):  # a dying parent may have forked: until none is left
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: processes outlived SIGKILL: {self.pids()}")

    def link(self, *, up: bool) -> None:
        _ip("link", "set", self.cable, "up" if up else "down")


@dataclass(frozen=True)
class Network:
    street: str  # the test's own address on the bridge
    hosts: dict[str, Host]


def _free_subnet() -> str:
    """A 10.x.y prefix no route of this machine's already covers (a /24 of our own)."""
    routes = _ip("-4", "route", "show", "table", "all")
    for _ in range(100):
        prefix = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        if f"{prefix}." not in routes:
            return prefix
    raise RuntimeError("no free 10.x.y.0/24 for the test network")


@contextlib.contextmanager
def network(names: Sequence[str]) -> Iterator[Network]:
    """One host per name (addresses .11, .12, ... in order) on a new bridge."""
    need_netns()
    suffix = f"{random.getrandbits(16):04x}"
    prefix = _free_subnet()
    bridge = f"ansbr{suffix}"
    hosts = {
        name: Host(name, f"ans-{suffix}-{name}", f"{prefix}.{11 + i}", f"ans{suffix}v{i}")
        for i, name in enumerate(names)
    }
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for host in hosts.values():
            _ip("netns", "add", host.netns)
            # the host's end made in its namespace: "eth0" is taken out here
            _ip(
                "link",
                "add",
                host.cable,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                host.netns,
            )
            _ip("link", "set", host.cable, "master", bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield Network(f"{prefix}.1", hosts)
    finally:
        for host in hosts.values():
            with contextlib.suppress(subprocess.CalledProcessError, AssertionError):
                host.kill_all()
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.netns)  # takes its veth pair along
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", bridge)


@dataclass
class HostedPg(PgServer):
    """A PostgreSQL server on a Host: listening on its address, run in its namespace."""

    on: Host

    @classmethod
    def on_host(cls, server: PgServer, on: Host) -> HostedPg:
        """`server` (created, not started) moved onto `on`, trusting the test's subnet."""
        hosted = cls(server.bin, server.folder, server.port, on)
        hosted._listen_on_host()
        subnet = on.address.rsplit(".", 1)[0] + ".0/24"
        with (server.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {subnet} trust\nhost replication all {subnet} trust\n")
        return hosted

    def _listen_on_host(self) -> None:
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{self.on.address}'\n")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.on.address}:{self.port}/{database}"

    def start(self) -> None:
        command = _as_postgres(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.folder / "server.log", "-w", "start"
        )
        subprocess.run(self.on.argv(*command), check=True, capture_output=True)

    def standby_on(self, on: Host) -> HostedPg:
        """A streaming standby of this (running) server on `on`, started: the same port,
        another host, as in production."""
        folder = Path(tempfile.mkdtemp(prefix="ansimi-pg-standby-", dir="/tmp"))
        if os.getuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        standby = HostedPg(self.bin, folder, self.port, on)
        copy = _as_postgres(
            self.bin / "pg_basebackup", "-h", self.on.address, "-p", str(self.port),
            "-U", SUPERUSER, "-D", standby.data, "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        subprocess.run(copy, check=True, capture_output=True)
        standby._listen_on_host()
        with (standby.data / "postgresql.conf").open("a") as conf:
            conf.write(f"unix_socket_directories = '{folder}'\n")
        standby.start()
        return standby


async def http_ok(url: str, timeout_s: float) -> None:
    """Until GET `url` answers 200 (bounded)."""
    async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.2)


class HostedGateway:
    """`python -m ansimi_edge gateway run` on a Host (or this one: `on` None), its API on
    the host's address."""

    def __init__(self, config: Path, api_port: int, on: Host | None = None) -> None:
        self.on = on
        self.config = config
        self.api_port = api_port
        self.log = config.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return self.on.address if self.on else "127.0.0.1"

    def start(self) -> None:
        command = [sys.executable, "-m", "ansimi_edge", "-v", "gateway", "run", "--config"]
        command.append(str(self.config))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.on.argv(*command) if self.on else command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def ready(self, timeout_s: float = 90.0) -> None:
        """Until /healthz answers 200 (from across the network, for a Host)."""
        try:
            await http_ok(f"http://{self.address}:{self.api_port}/healthz", timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"{self.config.stem} not ready: {self.log.read_text()[-3000:]}"
            ) from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: of every process on its Host, as when the host loses power."""
        if self.on is not None:
            self.on.kill_all()
        elif self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)
