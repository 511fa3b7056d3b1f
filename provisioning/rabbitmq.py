"""The RabbitMQ side of a site (a broker cluster), as broker_conf.py is mosquitto's.

Identity is the client certificate's CN (`ssl_cert_login_from = common_name`), as with
mosquitto's `use_identity_as_username`; a certificate login needs a user of that name to
exist, with no password. Each device's topic permissions use `{username}`, which RabbitMQ
expands in topic permissions only (not in the queue patterns: those name the device), so a
bell writes its own `up` topics and reads its own `down` topics and nothing else.
RabbitMQ's MQTT plugin maps the topic's '/' to '.', so `ansimi/v1/x/up/alert` is checked as
`ansimi.v1.x.up.alert` on the exchange `amq.topic`.

Users and permissions go in with one `rabbitmqctl import_definitions` (one Erlang start,
however many bells: a `rabbitmqctl` call costs about a second). Import only adds and
updates: revocation deletes the user, so its certificate can no longer log in (there is no
CRL check on this broker). On 3.10 deleting a user closes its MQTT connections at once
(measured: tests/cluster); those are not in `list_connections` there, so its AMQP ones
(and MQTT ones on 3.12+, where they are listed) are closed by pid as well. The default
`guest` user (a well-known password) is deleted too.
Facts measured on Debian's RabbitMQ 3.10.8: FIELD-NOTES-SCALE (shared notes).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from provisioning.revoke import fully_revoked_identities
from siteca import pki
from siteca.errors import ProvisioningError
from siteca.files import write_atomic
from siteca.site import DIAGNOSTIC_PREFIX, Site

VHOST: Final = "/"
EXCHANGE: Final = "amq.topic"
UPLINK_QUEUE: Final = "ansimi-uplink"
AMQP_PORT: Final = 5672
MQTT_TLS_PORT: Final = 8883
# The persistent MQTT session of a client id lives in this queue (RabbitMQ 3.10's naming).
_SESSION_QUEUE: Final = "mqtt-subscription-{client_id}"
PLUGINS: Final = ("rabbitmq_mqtt", "rabbitmq_auth_mechanism_ssl")


class RabbitError(ProvisioningError):
    """rabbitmqctl failed, or the node could not be reached."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One user's vhost permissions (queue and exchange names) and topic permissions."""

    user: str
    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def device_grant(device_id: str) -> Grant:
    """A bell: its own session queue; writes its own up topics, reads its own down ones."""
    own_queue = re.escape(_SESSION_QUEUE.format(client_id=pki.check_identity(device_id)))
    resources = rf"^(amq\.topic|{own_queue}.*)$"
    return Grant(
        user=device_id,
        configure=rf"^{own_queue}.*",
        write=resources,
        read=resources,
        topic_write=r"^ansimi\.v1\.{username}\.up\.",
        topic_read=r"^ansimi\.v1\.{username}\.down\.",
    )


def gateway_grant(gateway_id: str, queue: str = UPLINK_QUEUE) -> Grant:
    """A gateway: the uplink queue (declare, bind, consume), every bell's down topics, and
    its own probe topic (it hears its probes through the uplink queue: gateway/health.py)."""
    own_queue = re.escape(_SESSION_QUEUE.format(client_id=pki.check_identity(gateway_id)))
    resources = rf"^(amq\.topic|{re.escape(queue)}|{own_queue}.*)$"
    return Grant(
        user=gateway_id,
        configure=rf"^({re.escape(queue)}|{own_queue}.*)$",
        write=resources,
        read=resources,
        topic_write=r"^ansimi\.v1\.([^.]+\.down\.|{username}\.up\.probe$)",
        # the uplink queue's binding, ansimi.v1.*.up.#, is checked against this
        topic_read=r"^ansimi\.v1\.[^.]+\.up\.",
    )


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's `rabbit_password_hashing_sha256`: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(
    grants: Sequence[Grant], passwords: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The definitions document for `rabbitmqctl import_definitions` (or `load_definitions`).

    A user without a password (every bell) can only log in with its certificate.
    """
    passwords = passwords or {}
    users = []
    for g in grants:
        secret = passwords.get(g.user)
        users.append(
            {
                "name": g.user,
                "password_hash": password_hash(secret) if secret else "",
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
                "limits": {},
            }
        )
    return {
        "users": users,
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {
                "user": g.user,
                "vhost": VHOST,
                "configure": g.configure,
                "write": g.write,
                "read": g.read,
            }
            for g in grants
        ],
        "topic_permissions": [
            {
                "user": g.user,
                "vhost": VHOST,
                "exchange": EXCHANGE,
                "write": g.topic_write,
                "read": g.topic_read,
            }
            for g in grants
        ],
    }


def render_rabbitmq_conf(
    site: Site,
    *,
    mqtt_host: str = "0.0.0.0",
    mqtt_port: int = MQTT_TLS_PORT,
    amqp_host: str = "127.0.0.1",
    amqp_port: int = AMQP_PORT,
    cluster_nodes: Sequence[str] = (),
) -> str:
    """rabbitmq.conf for one node of the site's cluster (the same on every node)."""
    files = site.layout.broker
    lines = [
        "# written by `ansimi provision rabbitmq conf`; edit the generator, not this file.",
        "# AMQP: the gateways' uplink queue. Bells never speak AMQP; keep this port on the",
        "# gateways' network only (firewall: deploy/rabbitmq.md).",
        f"listeners.tcp.default = {amqp_host}:{amqp_port}",
        "# MQTT over mutual TLS only; the user is the client certificate's CN",
        "mqtt.listeners.tcp = none",
        f"mqtt.listeners.ssl.default = {mqtt_host}:{mqtt_port}",
        f"ssl_options.cacertfile = {files.ca_file}",
        f"ssl_options.certfile = {files.cert_file}",
        f"ssl_options.keyfile = {files.key_file}",
        "ssl_options.verify = verify_peer",
        "ssl_options.fail_if_no_peer_cert = true",
        "mqtt.ssl_cert_login = true",
        "ssl_cert_login_from = common_name",
        "mqtt.allow_anonymous = false",
        f"mqtt.vhost = {VHOST}",
        f"mqtt.exchange = {EXCHANGE}",
        "# a bell's persistent session is a replicated quorum queue: it survives its node",
        "mqtt.durable_queue_type = quorum",
    ]
    if cluster_nodes:
        lines += [
            "# A node cut off from the others stops (its bells and gateways move on) and",
            "# rejoins by itself when it can see them again. The default, `ignore`, left both",
            "# sides running after a cable pull and the cluster inconsistent once it was back:",
            "# the next failover nacked every publish (docs/scale.md).",
            f"cluster_partition_handling = {partition_handling(len(cluster_nodes))}",
            "cluster_formation.peer_discovery_backend = classic_config",
        ]
        lines += [
            f"cluster_formation.classic_config.nodes.{i} = {node}"
            for i, node in enumerate(cluster_nodes, 1)
        ]
    return "\n".join(lines) + "\n"


def partition_handling(nodes: int) -> str:
    """`pause_minority` needs a majority to survive a node's loss: three nodes or more.
    Of two, the one left is no majority and would stop too; `autoheal` keeps it running
    and restarts the losing side once the network is back."""
    return "pause_minority" if nodes >= 3 else "autoheal"


def enabled_plugins() -> str:
    return f"[{','.join(PLUGINS)}].\n"


class RabbitCtl:
    """`rabbitmqctl` against one node: the only door to the broker here (tests point it at
    a node of their own with `env`: HOME for the Erlang cookie, ERL_EPMD_PORT)."""

    def __init__(
        self,
        node: str,
        *,
        program: str = "rabbitmqctl",
        env: Mapping[str, str] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.node = node
        self._program = program
        self._env = {**os.environ, **(env or {})}
        self._timeout_s = timeout_s

    def run(self, *args: str) -> str:
        command = [self._program, "-q", "-n", self.node, *args]
        try:
            done = subprocess.run(
                command,
                env=self._env,
                capture_output=True,
                text=True,
                timeout=self._timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RabbitError(
                f"rabbitmqctl {args[0]} on {self.node}: {exc}; is rabbitmq-server installed "
                "and the node up (rabbitmqctl await_startup)?"
            ) from None
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise RabbitError(
                f"rabbitmqctl {args[0]} on {self.node} failed ({done.returncode}): "
                f"{why[-1] if why else 'no output'}; check the node name and the Erlang cookie"
            )
        return done.stdout

    def import_definitions(self, path: Path) -> None:
        self.run("import_definitions", str(path))

    def users(self) -> set[str]:
        return {u["user"] for u in json.loads(self.run("list_users", "--formatter", "json"))}

    def delete_user(self, user: str) -> None:
        self.run("delete_user", user)

    def connections_of(self, user: str) -> list[str]:
        rows = json.loads(self.run("list_connections", "pid", "user", "--formatter", "json"))
        return [str(r["pid"]) for r in rows if r.get("user") == user]

    def close_connection(self, pid: str, why: str) -> None:
        self.run("close_connection", pid, why)

    def cluster_state(self) -> tuple[set[str], set[str]]:
        """The nodes running, and those this node has seen partitioned from it (empty once
        the cluster is whole), as this node sees them."""
        status = json.loads(self.run("cluster_status", "--formatter", "json"))
        partitions = status.get("partitions") or {}
        # a map of node to the nodes it saw partitioned (a list, in some versions' output)
        seen = {str(node) for node in partitions}
        if isinstance(partitions, dict):
            for others in partitions.values():
                seen |= {str(node) for node in others}
        return {str(node) for node in status.get("running_nodes", [])}, seen

    def quorum_queues_short(self) -> list[str]:
        """Quorum queues with a member not online (a rejoined node's still catching up):
        losing another node now would take their quorum away. Output of another shape
        than 3.10.8's (`short_quorum_queues`) raises, never passes for a whole cluster."""
        out = self.run("list_queues", "name", "type", "members", "online", "--formatter", "json")
        try:
            rows = json.loads(out)
        except ValueError:
            raise RabbitError(
                f"rabbitmqctl list_queues on {self.node}: not JSON: {out.strip()[:300]!r}"
            ) from None
        return short_quorum_queues(rows)

    def mqtt_client_id_trackers(self) -> set[str]:
        """The nodes in the MQTT plugin's client-ID tracker (RabbitMQ 3.10's `mqtt_node`
        Raft cluster), as this node sees it.

        Every MQTT CONNECT registers its client id there, so the tracker needs a majority
        of its own members: nodes started together can leave one out (its join refused
        while the first leader was still being elected), and then losing one of the other
        two refuses every MQTT connection in the cluster ("Server unavailable").
        """
        out = self.run(
            "eval",
            "case ra:members({mqtt_node, node()}) of "
            '{ok, Members, _} -> string:join([atom_to_list(N) || {_, N} <- Members], " "); '
            '_ -> "" end.',
        )
        return set(out.strip().strip('"').split())


def short_quorum_queues(rows: object) -> list[str]:
    """The quorum queues in `list_queues name type members online --formatter json` with a
    member not online. Seen on RabbitMQ 3.10.8, a 3-node cluster with rmq1 stopped:

        {"name":"ansimi-uplink","type":"quorum",
         "members":["rmq1@localhost","rmq3@localhost","rmq2@localhost"],
         "online":["rmq3@localhost","rmq2@localhost"]}

    (classic queues: "type":"classic", "members":"", "online":""; streams: "stream", with
    lists). Anything else raises RabbitError with what was seen: a misread field would
    otherwise report every queue whole, always.
    """

    def unexpected(what: str, seen: object) -> RabbitError:
        return RabbitError(
            f"rabbitmqctl list_queues name type members online: {what}, saw {seen!r:.300}"
        )

    def nodes(value: object) -> list[str] | None:
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            return None
        return [str(n) for n in value]

    if not isinstance(rows, list):
        raise unexpected("expected a JSON list of queues", rows)
    short: list[str] = []
    for row in rows:
        if not (
            isinstance(row, dict)
            and isinstance(row.get("name"), str)
            and isinstance(row.get("type"), str)
        ):
            raise unexpected("expected a row with a name and a type", row)
        if row["type"] != "quorum":
            if "quorum" in row["type"].lower():
                raise unexpected("a quorum queue's type is not 'quorum'", row)
            continue
        members, online = nodes(row.get("members")), nodes(row.get("online"))
        if not members or online is None:
            raise unexpected("expected members and online as lists of node names", row)
        if set(members) - set(online):
            short.append(row["name"])
    return short


@dataclass(frozen=True, slots=True)
class RabbitFiles:
    conf: Path
    plugins: Path
    definitions: Path
    gateway_password: Path


def rabbit_files(site: Site) -> RabbitFiles:
    d = site.layout.root / "rabbitmq"
    return RabbitFiles(
        conf=d / "rabbitmq.conf",
        plugins=d / "enabled_plugins",
        definitions=d / "definitions.json",
        gateway_password=d / f"{site.gateway_id}.amqp-password",
    )


def site_identities(site: Site) -> tuple[list[str], list[str]]:
    """(bells allowed in, identities revoked), from the certificates the site issued.

    Installers' diagnostic identities are left to mosquitto: none on the cluster.
    """
    issued = site.issued()
    revoked = fully_revoked_identities(issued, {r.serial for r in site.revocations().revoked})
    names = {pki.common_name(c) for c in issued}
    allowed = sorted(
        n
        for n in names - set(revoked)
        if n != site.gateway_id and not n.startswith(DIAGNOSTIC_PREFIX)
    )
    return allowed, revoked


def gateway_password(site: Site) -> str:
    """The gateway's AMQP password: made once, kept 0600 beside the site's RabbitMQ files
    (its gateway.toml names the file: [uplink] password_file)."""
    path = rabbit_files(site).gateway_password
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        password = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, (password + "\n").encode(), mode=0o600)
        return password


def write_rabbitmq_files(site: Site, *, queue: str = UPLINK_QUEUE, **conf: Any) -> RabbitFiles:
    """rabbitmq.conf, enabled_plugins and definitions.json (every bell, the gateway)."""
    files = rabbit_files(site)
    files.conf.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(files.conf, render_rabbitmq_conf(site, **conf).encode())
    write_atomic(files.plugins, enabled_plugins().encode())
    allowed, _revoked = site_identities(site)
    grants = [gateway_grant(site.gateway_id, queue), *(device_grant(d) for d in allowed)]
    defs = definitions(grants, {site.gateway_id: gateway_password(site)})
    # it holds the gateway's password hash: readable by the broker's user only
    write_atomic(files.definitions, json.dumps(defs, indent=1).encode(), mode=0o600)
    return files


@dataclass(frozen=True, slots=True)
class SyncResult:
    users: int
    removed: list[str]
    closed: int


def sync(site: Site, ctl: RabbitCtl, *, queue: str = UPLINK_QUEUE) -> SyncResult:
    """Bring a running node (so the cluster) in line with the site: every bell and the
    gateway in, every revoked identity out and its open connections closed."""
    files = write_rabbitmq_files(site, queue=queue)
    ctl.import_definitions(files.definitions)
    allowed, revoked = site_identities(site)
    return remove_users(ctl, [*revoked, "guest"], allowed=len(allowed) + 1)


def remove_users(ctl: RabbitCtl, names: Iterable[str], *, allowed: int = 0) -> SyncResult:
    present = ctl.users()
    removed: list[str] = []
    closed = 0
    for name in names:
        if name not in present:
            continue
        # the user first: a connection closed before would come back and log in again
        ctl.delete_user(name)
        removed.append(name)
        for pid in ctl.connections_of(name):
            ctl.close_connection(pid, "revoked by ansimi provision")
            closed += 1
    return SyncResult(users=allowed, removed=removed, closed=closed)
