"""RabbitMQ nodes started by the tests as their own processes (never the system service).

Each node has its own RABBITMQ_NODENAME, ports, mnesia and log directories; epmd listens on
127.0.0.1 on a port of the test's own; every port is below the ephemeral range (other
programs' tests hold random ports in it) and checked free first (FIELD-NOTES-SCALE).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ansimi.broker import port_free
from provisioning.rabbitmq import RabbitCtl, enabled_plugins, render_rabbitmq_conf
from siteca.site import Site

SBIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 120.0


def rabbitmq_installed() -> bool:
    return (SBIN / "rabbitmq-server").exists()


def need_rabbitmq() -> None:
    if not rabbitmq_installed():
        pytest.fail(
            "rabbitmq-server is not installed: `apt-get install -y --no-install-recommends "
            "rabbitmq-server` (scripts/system-deps.sh does it)"
        )


def low_ports(count: int) -> list[int]:
    """`count` consecutive free ports below 32768 (the ephemeral range starts there)."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - count)
        ports = list(range(base, base + count))
        if all(port_free(p) for p in ports):
            return ports
    raise RuntimeError("no free block of ports below 32768")


@dataclass
class RabbitNode:
    name: str  # rmqN@localhost
    home: Path  # HOME: the shared Erlang cookie
    amqp_port: int
    mqtt_port: int
    dist_port: int
    epmd_port: int
    # the address every listener (epmd included) binds; another host's: name is rmq@<address>
    host: str = "127.0.0.1"
    # the network namespace standing for the node's host (tests/cluster/netns_kit.py)
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        short = self.name.split("@")[0]
        d = self.home
        return {
            "HOME": str(d),
            "RABBITMQ_NODENAME": self.name,
            # an address as the host part is a long name to Erlang (it has dots)
            "RABBITMQ_USE_LONGNAME": "true" if self.netns else "false",
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / f"log-{short}"),
            "RABBITMQ_CONFIG_FILE": str(d / f"{short}.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / f"{short}.pid"),
            "ERL_EPMD_ADDRESS": self.host,
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def _in_host(self, program: str) -> list[str]:
        """`program` run on the node's host: inside its network namespace, if it has one."""
        return ["ip", "netns", "exec", self.netns, program] if self.netns else [program]

    def _ctl_program(self) -> str:
        """rabbitmqctl as one program name (RabbitCtl's form): a script entering the node's
        namespace, since the CLI's own Erlang node must reach the server's epmd there."""
        if not self.netns:
            return str(SBIN / "rabbitmqctl")
        short = self.name.split("@")[0]
        script = self.home / f"{short}-rabbitmqctl"
        script.write_text(
            f'#!/bin/sh\nexec {" ".join(self._in_host(str(SBIN / "rabbitmqctl")))} "$@"\n'
        )
        script.chmod(0o755)
        return str(script)

    def ctl(self, timeout_s: float = 120.0) -> RabbitCtl:
        return RabbitCtl(
            self.name, program=self._ctl_program(), env=self.env(), timeout_s=timeout_s
        )

    @property
    def amqp_url(self) -> str:
        return f"amqp://{self.host}:{self.amqp_port}/"

    def start(self, conf: str) -> None:
        short = self.name.split("@")[0]
        (self.home / f"{short}.conf").write_text(conf + "log.console = false\n")
        out = (self.home / f"{short}.out").open("wb")
        self.process = subprocess.Popen(
            self._in_host(str(SBIN / "rabbitmq-server")),
            env={**os.environ, **self.env()},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a SIGKILL takes the whole Erlang VM
        )

    def await_startup(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll: `await_startup` fails at once until the node has registered with epmd."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.log_tail()}")
            done = subprocess.run(
                [self._ctl_program(), "-q", "-n", self.name, "await_startup"],
                env={**os.environ, **self.env()},
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
            if done.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not up in {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        short = self.name.split("@")[0]
        path = self.home / f"{short}.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL of the node's whole process group (beam and its helpers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):
            self.ctl().run("stop")
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()


def prepare_home(home: Path) -> None:
    """The nodes' shared HOME: a new Erlang cookie and the plugins to enable."""
    need_rabbitmq()
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    cookie.write_text(f"ANSIMI-TEST-{random.getrandbits(64):x}")
    cookie.chmod(0o400)
    (home / "enabled_plugins").write_text(enabled_plugins())


def start_provisioned(site: Site, node: RabbitNode, cluster_nodes: Sequence[str]) -> None:
    """Start `node` on the site's provisioned rabbitmq.conf, clustered with `cluster_nodes`
    (none: on its own)."""
    node.start(
        render_rabbitmq_conf(
            site,
            mqtt_host=node.host,
            mqtt_port=node.mqtt_port,
            amqp_host=node.host,
            amqp_port=node.amqp_port,
            cluster_nodes=list(cluster_nodes),
        )
    )


@contextlib.contextmanager
def nodes_running(site: Site, nodes: Sequence[RabbitNode]) -> Iterator[Sequence[RabbitNode]]:
    """`nodes` (made on a `prepare_home` folder) running the site's provisioned
    rabbitmq.conf, clustered if more than one, until the block ends."""
    names = [n.name for n in nodes] if len(nodes) > 1 else []
    try:
        # One at a time, as deploy/rabbitmq.md says: started together, a node's join to the
        # MQTT client-ID tracker was refused now and then, and losing one of the other two
        # nodes then refused every bell (the multi-host test's cable pull failed on it).
        for n, node in enumerate(nodes):
            start_provisioned(site, node, names)
            node.await_startup()
            if names:
                _await_tracker(nodes[0], {m.name for m in nodes[: n + 1]})
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _await_tracker(seed: RabbitNode, members: set[str]) -> None:
    """Until the MQTT client-ID tracker has every node started so far (its majority is
    what every MQTT connect needs; provisioning.rabbitmq.RabbitCtl)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = seed.ctl().mqtt_client_id_trackers()
        if members <= seen:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"the MQTT client-ID tracker has {sorted(seen)}, not all of {sorted(members)}"
    )


@contextlib.contextmanager
def rabbit_cluster(site: Site, home: Path, count: int = 1) -> Iterator[Sequence[RabbitNode]]:
    """`count` nodes on loopback running the site's provisioned rabbitmq.conf, clustered,
    then stopped (and the epmd they shared ended)."""
    prepare_home(home)
    ports = low_ports(1 + 3 * count)
    epmd_port = ports[0]
    nodes = [
        RabbitNode(
            name=f"rmq{i + 1}@localhost",
            home=home,
            amqp_port=ports[1 + 3 * i],
            mqtt_port=ports[2 + 3 * i],
            dist_port=ports[3 + 3 * i],
            epmd_port=epmd_port,
        )
        for i in range(count)
    ]
    try:
        with nodes_running(site, nodes):
            yield nodes
    finally:
        _stop_epmd(home, epmd_port)


def _stop_epmd(home: Path, port: int) -> None:
    """epmd outlives the nodes: ask it to stop (it listens on our own port only)."""
    with contextlib.suppress(Exception):
        subprocess.run(
            [shutil.which("epmd") or "/usr/bin/epmd", "-kill"],
            env={**os.environ, "HOME": str(home), "ERL_EPMD_PORT": str(port)},
            capture_output=True,
            timeout=10,
            check=False,
        )
