"""The gateway's configuration: `/etc/ansimi/gateway.toml`, validated by pydantic.

Every option has a safe default; `gateway/gateway.example.toml` explains each one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, PrivateAttr, model_validator

from gateway.video.config import VideoConfig
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
    # how long the broker keeps this instance's session (and queues its share of a shared
    # subscription) while it is away: long enough to cover a restart, short because
    # mosquitto keeps handing a dead instance its share until the session expires
    session_expiry_s: Annotated[int, Field(ge=0, le=7 * 24 * 3600)] = 60
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


class SuperviseConfig(_Section):
    # how often devices send a heartbeat (their device.toml `mqtt.heartbeat_s`)
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    # a device is offline after this many heartbeat intervals without a word from it
    missed: Annotated[int, Field(ge=1, le=100)] = 3
    # how often overdue devices are looked for
    tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0

    @property
    def timeout_ms(self) -> int:
        return int(self.heartbeat_s * self.missed * 1000)


class ApiToken(_Section):
    # who holds the token (a centre or an operator desk): shown in logs and stage history
    name: DeviceId
    # operator: alerts and devices; admin: also registers and revokes devices
    role: Literal["operator", "admin"] = "operator"
    # the token itself, or (better) a file holding it, readable by the service only
    token: Annotated[str | None, Field(min_length=16, repr=False)] = None
    token_file: Path | None = None
    _secret: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _one_source(self) -> ApiToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError(f"token {self.name}: set exactly one of token and token_file")
        if self.token_file is not None:
            try:
                secret = self.token_file.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"token {self.name}: cannot read token_file {self.token_file} "
                    f"({exc.strerror}): create it, readable by the service user"
                ) from None
            if len(secret) < 16:
                raise ValueError(
                    f"token {self.name}: {self.token_file} holds fewer than 16 characters: "
                    "put a long random token there (`openssl rand -hex 32`)"
                )
            self._secret = secret
        else:
            self._secret = self.token or ""
        return self

    @property
    def secret(self) -> str:
        return self._secret


class ApiConfig(_Section):
    # the operator HTTP API (acks, devices, alerts, metrics); off unless tokens are set
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8480
    tokens: list[ApiToken] = []

    @model_validator(mode="after")
    def _usable(self) -> ApiConfig:
        if self.enabled and not self.tokens:
            raise ValueError("the API is enabled but has no [[api.tokens]]: add at least one")
        names = [t.name for t in self.tokens]
        if len(names) != len(set(names)):
            raise ValueError("two [[api.tokens]] share a name: give each its own")
        return self


class GatewayConfig(_Section):
    id: DeviceId = "gw-local"
    signing_key: Path = Path("/var/lib/ansimi/gateway/signing.key")
    database: Path = Path("/var/lib/ansimi/gateway/gateway.db")
    mqtt: MqttConfig = MqttConfig()
    intake: IntakeConfig = IntakeConfig()
    forward: ForwardConfig = ForwardConfig()
    supervise: SuperviseConfig = SuperviseConfig()
    api: ApiConfig = ApiConfig()
    video: VideoConfig = VideoConfig()
    centres: list[Centre] = []

    @model_validator(mode="after")
    def _names_unique(self) -> GatewayConfig:
        names = [c.name for c in self.centres]
        if len(names) != len(set(names)):
            raise ValueError("two [[centres]] share a name: give each centre its own name")
        return self

    def centres_for(self, district: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.centres if c.serves(district))
