"""The ACL text and the broker config a site renders (the broker's behaviour is tested in
tests/integration/provisioning against a real mosquitto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.probe import probe_topic
from siteca.broker_conf import BrokerFiles, broker_config, render_acl
from siteca.errors import InvalidName


def _rules(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_devices_write_only_their_up_and_read_only_their_down_keyed_on_the_cert_cn() -> None:
    rules = _rules(render_acl(["gw-alpha"]))
    assert rules[:2] == ["pattern write ansimi/v1/%u/up/#", "pattern read ansimi/v1/%u/down/#"]
    # nothing else applies to every client
    assert [r for r in rules if r.startswith("pattern")] == rules[:2]


@pytest.mark.parametrize("revoked", [(), ("bell-0001", "gw-alpha")])
def test_no_rule_anywhere_uses_the_client_chosen_client_id(revoked: tuple[str, ...]) -> None:
    text = render_acl(["gw-alpha", "gw-beta"], revoked)
    assert "%c" not in text


def test_gateway_reads_all_up_and_writes_all_down_in_its_own_user_block() -> None:
    rules = _rules(render_acl(["gw-alpha"]))
    block = rules[rules.index("user gw-alpha") :]
    assert block == [
        "user gw-alpha",
        "topic read ansimi/v1/+/up/#",
        "topic write ansimi/v1/+/down/#",
        # its intake probe, on the topic protocol/probe.py builds
        f"topic write {probe_topic('gw-alpha')}",
    ]


def test_revoked_identities_are_denied_everything() -> None:
    rules = _rules(render_acl(["gw-alpha"], ["bell-0002", "bell-0001", "bell-0002"]))
    tail = rules[rules.index("user bell-0001") :]
    assert tail == ["user bell-0001", "topic deny #", "user bell-0002", "topic deny #"]


def test_a_revoked_gateway_keeps_its_block_with_a_deny_instead_of_its_grants() -> None:
    rules = _rules(render_acl(["gw-alpha"], ["gw-alpha"]))
    assert rules[2:] == ["user gw-alpha", "topic deny #"]


@pytest.mark.parametrize(
    "bad", ["gw-alpha\ntopic readwrite #", "gw alpha", "GW-ALPHA", "gw/alpha", "gw-#", "gw-+"]
)
def test_an_id_that_could_inject_a_rule_or_a_wildcard_is_refused(bad: str) -> None:
    with pytest.raises(InvalidName):
        render_acl([bad])
    with pytest.raises(InvalidName):
        render_acl(["gw-alpha"], [bad])


def test_every_line_is_a_comment_or_a_mosquitto_acl_directive() -> None:
    for line in _rules(render_acl(["gw-alpha", "gw-beta"], ["bell-0001"])):
        keyword, access, *rest = line.split(" ")
        assert keyword in {"pattern", "topic", "user"}
        if keyword != "user":
            assert access in {"read", "write", "deny"} and len(rest) == 1


def _files(tmp_path: Path) -> BrokerFiles:
    return BrokerFiles(
        ca_file=tmp_path / "ca.crt",
        cert_file=tmp_path / "server.crt",
        key_file=tmp_path / "server.key",
        crl_file=tmp_path / "crl.pem",
        acl_file=tmp_path / "acl",
        data_dir=tmp_path / "data",
    )


def test_broker_config_requires_a_certificate_and_takes_identity_from_it(tmp_path: Path) -> None:
    text = broker_config(_files(tmp_path), host="127.0.0.1", port=18883).render()
    lines = text.splitlines()
    for expected in (
        "listener 18883 127.0.0.1",
        "allow_anonymous false",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"cafile {tmp_path / 'ca.crt'}",
        f"certfile {tmp_path / 'server.crt'}",
        f"keyfile {tmp_path / 'server.key'}",
        f"crlfile {tmp_path / 'crl.pem'}",
        f"acl_file {tmp_path / 'acl'}",
        f"persistence_location {tmp_path / 'data'}/",
        "persistence true",
    ):
        assert expected in lines, expected
    # listener options only apply after their listener line
    assert lines.index("use_username_as_clientid true") > lines.index("listener 18883 127.0.0.1")
    # mosquitto's own default, spelled out: started as root it drops to this user
    assert [line for line in lines if line.startswith("user ")] == ["user mosquitto"]


def test_broker_config_runs_as_the_given_user_only_when_asked(tmp_path: Path) -> None:
    lines = broker_config(_files(tmp_path), run_as="tester").render().splitlines()
    assert "user tester" in lines


def test_a_diagnostic_identity_only_reads_and_is_shut_out_of_the_device_patterns() -> None:
    from siteca.broker_conf import diagnostic_filter

    grants = {"diag-kim": diagnostic_filter(None), "diag-lee": diagnostic_filter("bell-0001")}
    rules = _rules(render_acl(["gw-alpha"], (), grants))
    kim = rules[rules.index("user diag-kim") :][:3]
    assert kim == [
        "user diag-kim",
        "topic deny ansimi/v1/diag-kim/#",
        "topic read ansimi/v1/+/up/#",
    ]
    lee = rules[rules.index("user diag-lee") :][:3]
    assert lee[2] == "topic read ansimi/v1/bell-0001/#"
    assert not [r for r in rules if "diag" in r and ("write" in r or "readwrite" in r)]


def test_a_revoked_or_damaged_diagnostic_grant_grants_nothing() -> None:
    grants = {"diag-kim": "ansimi/v1/+/up/#", "diag-eve": "#", "diag-bob": "ansimi/v1/+/down/#"}
    rules = _rules(render_acl(["gw-alpha"], ["diag-kim"], grants))
    assert rules[rules.index("user diag-kim") + 1] == "topic deny #"
    assert "user diag-eve" not in rules and "user diag-bob" not in rules


def test_the_broker_takes_no_packet_bigger_than_the_gateway_reads(tmp_path: Path) -> None:
    from protocol.jws import MAX_TOKEN_BYTES
    from protocol.topics import MAX_PACKET_BYTES

    files = BrokerFiles(*(tmp_path / n for n in ("ca", "crt", "key", "crl", "acl", "data")))
    text = broker_config(files).render()
    assert f"max_packet_size {MAX_PACKET_BYTES}" in text
    assert MAX_TOKEN_BYTES < MAX_PACKET_BYTES <= MAX_TOKEN_BYTES + 1024
