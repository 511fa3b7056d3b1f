"""The gateway's configuration: `/etc/ansimi/gateway.toml`, validated by pydantic.

Every option has a safe default; `gateway/gateway.example.toml` explains each one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from protocol.ids import DeviceId


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    version: Literal[5, 311] = 5
    # several gateway instances split the uplink through this shared-subscription group;
    # empty means a plain subscription (an MQTT 3.1.1-only broker such as amqtt)
    shared_group: str = "gateways"
    # each instance needs its own, stable across restarts (its persistent session); empty
    # means the gateway id
    client_id: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


class Centre(_Section):
    name: DeviceId
    url: HttpUrl
    # HMAC-SHA256 key for the X-Ansimi-Signature header; the centre holds the same
    secret: Annotated[str, Field(min_length=16)]
    # districts this centre serves; ["*"] is the central centre, which gets everything
    districts: list[str] = ["*"]

    def serves(self, district: str) -> bool:
        return "*" in self.districts or district in self.districts


class ForwardConfig(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    backoff_min_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    # deliveries in flight at once per centre
    concurrency: Annotated[int, Field(ge=1, le=256)] = 16


class IntakeConfig(_Section):
    # a message whose timestamp is further than this from the gateway's clock is refused
    window_s: Annotated[float, Field(gt=0)] = 300.0
    max_message_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 16 * 1024
    # messages verified and committed together (group commit)
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 500


class GatewayConfig(_Section):
    id: DeviceId = "gw-local"
    signing_key: Path = Path("/var/lib/ansimi/gateway/signing.key")
    database: Path = Path("/var/lib/ansimi/gateway/gateway.db")
    mqtt: MqttConfig = MqttConfig()
    intake: IntakeConfig = IntakeConfig()
    forward: ForwardConfig = ForwardConfig()
    centres: list[Centre] = []

    @model_validator(mode="after")
    def _names_unique(self) -> GatewayConfig:
        names = [c.name for c in self.centres]
        if len(names) != len(set(names)):
            raise ValueError("two [[centres]] share a name: give each centre its own name")
        return self

    def centres_for(self, district: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.centres if c.serves(district))
