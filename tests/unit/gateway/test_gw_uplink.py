"""The uplink's choice and its RabbitMQ topic mapping (the broker itself: tests/cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ansimi.config import ConfigError, parse_config
from gateway.config import GatewayConfig, UplinkConfig
from gateway.uplink import UP_ROUTING_KEY, amqp_routing_key, mqtt_topic
from protocol.topics import UP_FILTER, up_topic

ROUTE = (
    '[[centres]]\nname = "central"\nurl = "https://c.example/events"\nsecret = "0123456789abcdef"\n'
)


def test_the_up_filter_becomes_rabbitmqs_routing_key() -> None:
    assert UP_ROUTING_KEY == "ansimi.v1.*.up.#"
    assert amqp_routing_key(UP_FILTER) == UP_ROUTING_KEY


def test_a_routing_key_gives_back_the_bells_topic() -> None:
    topic = up_topic("bell-0001", "alert")
    assert mqtt_topic(amqp_routing_key(topic)) == topic


def test_amqp_needs_a_url_without_a_password(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="amqp_url"):
        UplinkConfig(kind="amqp")
    with pytest.raises(ValidationError, match="password_file"):
        UplinkConfig(kind="amqp", amqp_url="amqp://gw:secret@10.0.0.5:5672/")


def test_the_password_comes_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "gw.amqp-password"
    secret.write_text("s3cret-from-file\n")
    config = UplinkConfig(kind="amqp", amqp_url="amqp://gw@10.0.0.5:5672/", password_file=secret)
    assert config.password == "s3cret-from-file"


def test_an_unreadable_password_file_names_the_file_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    text = (
        '[uplink]\nkind = "amqp"\namqp_url = "amqp://gw@10.0.0.5:5672/"\n'
        f'password_file = "{tmp_path / "missing"}"\n' + ROUTE
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, GatewayConfig, path)
    message = str(caught.value)
    assert "gateway.toml" in message and "password_file" in message and "provision" in message
