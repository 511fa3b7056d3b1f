"""The RabbitMQ side of a site, as files and grants (on a real node: tests/cluster)."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import pytest

from provisioning.rabbitmq import (
    RabbitError,
    definitions,
    device_grant,
    gateway_grant,
    password_hash,
    render_rabbitmq_conf,
    short_quorum_queues,
)
from siteca.site import Site, init_site


def as_user(pattern: str, user: str) -> re.Pattern[str]:
    """What RabbitMQ does with a topic permission: `{username}` expanded, then a regex."""
    return re.compile(pattern.replace("{username}", user))


def test_a_bell_writes_its_own_up_and_reads_its_own_down_only() -> None:
    grant = device_grant("bell-0001")
    write = as_user(grant.topic_write, "bell-0001")
    read = as_user(grant.topic_read, "bell-0001")
    assert write.match("ansimi.v1.bell-0001.up.alert")
    assert not write.match("ansimi.v1.bell-0002.up.alert")
    assert not write.match("ansimi.v1.bell-0001.down.ack")
    assert read.match("ansimi.v1.bell-0001.down.ack")
    assert not read.match("ansimi.v1.bell-0002.down.ack")
    # its persistent session's queue, not another bell's
    assert re.match(grant.configure, "mqtt-subscription-bell-0001qos1")
    assert not re.match(grant.configure, "mqtt-subscription-bell-0002qos1")


def test_the_gateway_reads_every_up_writes_every_down_and_its_own_probe() -> None:
    grant = gateway_grant("gw-test")
    write = as_user(grant.topic_write, "gw-test")
    read = as_user(grant.topic_read, "gw-test")
    assert read.match("ansimi.v1.*.up.#")  # the uplink queue's binding
    assert write.match("ansimi.v1.bell-0001.down.ack")
    assert write.match("ansimi.v1.gw-test.up.probe")
    assert not write.match("ansimi.v1.bell-0001.up.alert")
    assert not write.match("ansimi.v1.gw-other.up.probe")


def test_the_password_hash_is_rabbitmqs_sha256() -> None:
    hashed = base64.b64decode(password_hash("pw", salt=b"salt"))
    assert hashed == b"salt" + hashlib.sha256(b"saltpw").digest()


def test_bells_have_no_password_the_gateway_has_one() -> None:
    defs = definitions([gateway_grant("gw-test"), device_grant("bell-0001")], {"gw-test": "pw"})
    hashes = {u["name"]: u["password_hash"] for u in defs["users"]}
    assert hashes["bell-0001"] == ""
    assert hashes["gw-test"] != ""


def test_the_conf_is_mutual_tls_with_cn_login_and_quorum_sessions(tmp_path: Path) -> None:
    init_site(tmp_path / "site", site="test", listen_host="127.0.0.1", port=8883)
    text = render_rabbitmq_conf(
        Site.open(tmp_path / "site"), cluster_nodes=["rabbit@a", "rabbit@b"]
    )
    conf = dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)
    assert conf["ssl_options.verify"] == "verify_peer"
    assert conf["ssl_options.fail_if_no_peer_cert"] == "true"
    assert conf["ssl_cert_login_from"] == "common_name"
    assert conf["mqtt.allow_anonymous"] == "false"
    assert conf["mqtt.durable_queue_type"] == "quorum"
    assert conf["mqtt.listeners.tcp"] == "none"
    assert conf["cluster_formation.classic_config.nodes.2"] == "rabbit@b"
    # of two nodes, the one left after a loss is no majority: pause_minority would stop it
    assert conf["cluster_partition_handling"] == "autoheal"
    three = render_rabbitmq_conf(
        Site.open(tmp_path / "site"), cluster_nodes=["rabbit@a", "rabbit@b", "rabbit@c"]
    )
    assert "cluster_partition_handling = pause_minority\n" in three


def test_provision_rabbitmq_conf_writes_the_files_and_a_private_password(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from provisioning.cli import provision
    from provisioning.rabbitmq import rabbit_files

    init_site(tmp_path / "site", site="test", listen_host="127.0.0.1", port=8883)
    result = CliRunner().invoke(provision, ["rabbitmq", "conf", "--dir", str(tmp_path / "site")])
    assert result.exit_code == 0, result.output
    files = rabbit_files(Site.open(tmp_path / "site"))
    assert files.conf.read_text() == render_rabbitmq_conf(Site.open(tmp_path / "site"))
    assert files.gateway_password.stat().st_mode & 0o077 == 0
    assert files.definitions.stat().st_mode & 0o077 == 0
    # the password is kept: a second run must not lock the running gateway out
    first = files.gateway_password.read_text()
    CliRunner().invoke(provision, ["rabbitmq", "conf", "--dir", str(tmp_path / "site")])
    assert files.gateway_password.read_text() == first


# rows as `rabbitmqctl list_queues name type members online --formatter json` gives them
# (RabbitMQ 3.10.8, seen on a 3-node cluster: tests/cluster/test_rabbit_failover.py)
_NODES = ["rmq1@localhost", "rmq3@localhost", "rmq2@localhost"]
_CLASSIC = {"name": "old", "type": "classic", "members": "", "online": ""}


def test_a_quorum_queue_missing_an_online_member_is_short_and_others_are_not() -> None:
    rows = [
        {"name": "whole", "type": "quorum", "members": _NODES, "online": _NODES[::-1]},
        {"name": "behind", "type": "quorum", "members": _NODES, "online": _NODES[1:]},
        {"name": "log", "type": "stream", "members": _NODES, "online": []},
        _CLASSIC,
    ]
    assert short_quorum_queues(rows) == ["behind"]
    assert short_quorum_queues([_CLASSIC]) == []


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        ({"name": "q"}, "a JSON list of queues"),
        ([{"name": "q", "members": _NODES}], "a row with a name and a type"),
        ([{"name": "q", "type": "rabbit_quorum_queue"}], "type is not 'quorum'"),
        ([{"name": "q", "type": "quorum", "members": [], "online": []}], "lists of node names"),
        ([{"name": "q", "type": "quorum", "members": "", "online": ""}], "lists of node names"),
        ([{"name": "q", "type": "quorum", "members": [{"node": "rmq1"}], "online": []}], "lists"),
    ],
)
def test_a_list_queues_output_of_another_shape_is_an_error_not_all_whole(
    rows: object, said: str
) -> None:
    with pytest.raises(RabbitError, match=re.escape(said)):
        short_quorum_queues(rows)
