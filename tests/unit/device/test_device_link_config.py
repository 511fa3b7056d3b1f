"""`[link]` in device.toml: how the link finds out it is dead, and where it goes next."""

from __future__ import annotations

from pathlib import Path

import pytest

from ansimi.config import ConfigError, load_config
from device.config import DeviceConfig
from device.link import Link
from device.outbox import Outbox
from protocol.jws import Signer
from protocol.keys import generate_key


def link_for(tmp_path: Path, toml: str) -> Link:
    path = tmp_path / "device.toml"
    path.write_text(toml)
    config = load_config(path, DeviceConfig)
    outbox = Outbox(tmp_path / "outbox.db")
    try:
        signer = Signer(config.device.id, generate_key())
        return Link(config, signer, generate_key().public_key(), outbox, lambda _m: None)
    finally:
        outbox.close()  # the link only took a sequence number for its will


def test_the_session_gets_the_bound_the_addresses_and_a_keepalive_from_the_heartbeat(
    tmp_path: Path,
) -> None:
    link = link_for(
        tmp_path,
        """
[mqtt]
host = "10.0.0.1"
port = 8883
heartbeat_s = 7.5
[link]
ack_timeout_s = 2.5
other_brokers = ["10.0.0.2:8884", "[fd00::3]:8883"]
""",
    )
    settings = link.session.settings
    assert settings.ack_timeout_s == 2.5
    # a link quiet for a heartbeat and its PUBACK's time is probed (in whole seconds)
    assert settings.keepalive_s == 10
    assert settings.other_addresses == (("10.0.0.2", 8884), ("fd00::3", 8883))
    assert link.session.address == ("10.0.0.1", 8883)


def test_with_the_defaults_a_quiet_dead_link_is_found_within_two_heartbeats(
    tmp_path: Path,
) -> None:
    settings = link_for(tmp_path, "").session.settings
    heartbeat_s = DeviceConfig().mqtt.heartbeat_s
    # probed after a keepalive of quiet, dead ack_timeout_s later
    assert settings.keepalive_s + settings.ack_timeout_s <= 2 * heartbeat_s
    assert settings.other_addresses == ()  # one broker unless told


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ("ack_timeout_s = 0", "link.ack_timeout_s", "greater than 0"),
        ('other_brokers = ["10.0.0.2"]', "link.other_brokers", "is not host:port"),
        ('other_brokers = ["10.0.0.2:0"]', "link.other_brokers", "from 1 to 65535"),
        # fullwidth digits pass str.isdigit(), not the port check
        ('other_brokers = ["broker:\uff18\uff18"]', "link.other_brokers", "from 1 to 65535"),
    ],
)
def test_a_bad_link_value_names_the_file_the_key_and_the_fix(
    tmp_path: Path, line: str, key: str, says: str
) -> None:
    path = tmp_path / "device.toml"
    path.write_text(f"[link]\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, DeviceConfig)
    message = str(caught.value)
    assert str(path) in message and f"`{key}`" in message and says in message
    assert "Fix:" in message
