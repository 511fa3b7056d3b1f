"""The gateway's configuration: `/etc/ansimi/gateway.toml`, validated by pydantic.

Every option has a safe default; `gateway/gateway.example.toml` explains each one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    HttpUrl,
    PrivateAttr,
    StringConstraints,
    field_validator,
    model_validator,
)

from ansimi.config import BrokerAddresses, broker_addresses
from ansimi.districts import SEOUL_DISTRICTS, check_district
from gateway.incidents import DEFAULT_PROCEDURES, IncidentKind, ProcedureStep
from gateway.store import check_store_url, sqlite_url
from gateway.video.config import VideoConfig
from protocol.errors import Malformed
from protocol.ids import STEP_NAME_PATTERN, DeviceId
from protocol.keys import public_key_from_b64


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
    # further brokers, "host:port", tried in turn after host and port (a cluster's nodes)
    other_brokers: BrokerAddresses = []

    def other_addresses(self) -> tuple[tuple[str, int], ...]:
        return broker_addresses(self.other_brokers)


class UplinkConfig(_Section):
    """Where the devices' messages come from (gateway/uplink.py)."""

    # "mqtt": the [mqtt] session's subscription (mosquitto); "amqp": a quorum queue bound to
    # amq.topic, consumed over AMQP (a RabbitMQ cluster, whose $share delivers nothing)
    kind: Literal["mqtt", "amqp"] = "mqtt"
    # amqp://<user>@<host>:<port>/<vhost>, without the password (that is in password_file)
    amqp_url: str = ""
    password_file: Path | None = None
    # further nodes, "host:port", tried in turn when amqp_url's node is lost (same user)
    other_nodes: BrokerAddresses = []
    # the queue every instance consumes; one per site
    queue: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,200}$")] = "ansimi-uplink"
    # messages the broker hands this instance ahead of the intake
    prefetch: Annotated[int, Field(ge=1, le=10_000)] = 200
    _password: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _amqp_complete(self) -> UplinkConfig:
        if self.kind != "amqp":
            return self
        if not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                'uplink.amqp_url: kind = "amqp" needs amqp://<user>@<host>:<port>/ '
                "(the RabbitMQ node the gateway consumes from)"
            )
        if ":" in self.amqp_url.split("://", 1)[1].split("@", 1)[0] and "@" in self.amqp_url:
            raise ValueError(
                "uplink.amqp_url holds a password: remove it and put it in a file named "
                "by uplink.password_file"
            )
        if self.password_file is not None:
            try:
                self._password = self.password_file.read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"uplink.password_file: cannot read {self.password_file} "
                    f"({exc.strerror}): write the AMQP password there (`ansimi provision "
                    "rabbitmq` makes it) or fix the path"
                ) from exc
        return self

    @property
    def password(self) -> str:
        return self._password


class Centre(_Section):
    name: DeviceId
    url: HttpUrl
    # HMAC-SHA256 key for the X-Ansimi-Signature header; the centre holds the same
    secret: Annotated[str, Field(min_length=16)]
    # districts this centre serves; ["*"] is the central centre, which gets everything
    districts: list[str] = ["*"]
    # CA bundle (PEM) that signs the centre's HTTPS certificate; unset: the system's CAs
    ca_file: Path | None = None
    # forwarded events carry the device's address and floor (personal data) only if true
    send_address: bool = False

    @field_validator("districts")
    @classmethod
    def _known_districts(cls, districts: list[str]) -> list[str]:
        return [check_district(d, allow_all=True) for d in districts]

    def serves(self, district: str) -> bool:
        return "*" in self.districts or district in self.districts


_Hex = Annotated[str, StringConstraints(pattern=r"^[0-9A-Fa-f]+$")]


class SiaReceiver(_Section):
    """An existing alarm receiver fed SIA DC-09 over TCP: one more centre to the outbox."""

    name: DeviceId
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)]
    districts: list[str] = ["*"]
    # SIA-DCS (letter codes: PA, HA, TA...) or ADM-CID (Contact ID numbers: E120, E121...)
    format: Literal["SIA-DCS", "ADM-CID"] = "SIA-DCS"
    # the account number the receiver knows this gateway by (3-16 hex digits)
    account: Annotated[_Hex, Field(min_length=3, max_length=16)]
    # per-device account numbers, where each bell is its own account at the receiver
    accounts: dict[DeviceId, Annotated[_Hex, Field(min_length=3, max_length=16)]] = {}
    # receiver and line numbers of the DC-09 header (R..., L...), 1-6 hex digits
    receiver: Annotated[_Hex, Field(min_length=1, max_length=6)] | None = None
    line: Annotated[_Hex, Field(min_length=1, max_length=6)] = "0"
    # AES key (16, 24 or 32 characters); unset sends in clear
    key: Annotated[str | None, Field(repr=False)] = None
    # "ascii": the key's characters are the AES key bytes (pysiaalarm, Ajax panels);
    # "hex": the key is hex digits (32, 48 or 64) to decode first, as DC-09 writes it
    key_format: Literal["ascii", "hex"] = "ascii"
    # seconds to wait for the receiver's ACK before the message counts as not delivered
    ack_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0

    @field_validator("districts")
    @classmethod
    def _known_districts(cls, districts: list[str]) -> list[str]:
        return [check_district(d, allow_all=True) for d in districts]

    @model_validator(mode="after")
    def _key_fits(self) -> SiaReceiver:
        if self.key is not None and len(self.aes_key or b"") not in (16, 24, 32):
            raise ValueError(
                f"sia {self.name}: key must give 16, 24 or 32 bytes "
                f"({self.key_format}): check its length and key_format"
            )
        return self

    @property
    def aes_key(self) -> bytes | None:
        if self.key is None:
            return None
        if self.key_format == "ascii":
            return self.key.encode("ascii", "replace")
        try:
            return bytes.fromhex(self.key)
        except ValueError:
            return b""

    def serves(self, district: str) -> bool:
        return "*" in self.districts or district in self.districts


class ForwardConfig(_Section):
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    backoff_min_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    # deliveries in flight at once per centre
    concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    # a centre failing this many attempts in a row is left alone (circuit open)...
    breaker_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    # ...for this many seconds, then one probe decides whether it is back
    breaker_open_s: Annotated[float, Field(gt=0, le=3600)] = 10.0


class IntakeConfig(_Section):
    # a timestamp further than this from the gateway's clock is flagged and synced, not
    # refused (protocol.replay, rule 2)
    window_s: Annotated[float, Field(gt=0)] = 300.0
    max_message_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 16 * 1024
    # messages verified and committed together (group commit)
    batch_max: Annotated[int, Field(ge=1, le=10_000)] = 500
    # received and not yet checked: at this many, reading from the broker pauses until
    # half are done, so an overload queues at the broker (and in the devices' outboxes)
    # instead of growing this process without bound
    queue_max: Annotated[int, Field(ge=1, le=1_000_000)] = 5_000
    # re-read the device registry this often, to follow other instances' registrations,
    # revocations and high-water marks; 0: only at start and on this instance's admin calls
    registry_reload_s: Annotated[float, Field(ge=0)] = 10.0
    # heartbeats are kept together at most this often (liveness only: alerts never wait);
    # at most half the silence timeout less one heartbeat. 0: each as it arrives
    heartbeat_flush_s: Annotated[float, Field(ge=0, le=10)] = 1.0


@dataclass(frozen=True, slots=True)
class OutageRule:
    """When offline reports of one district become one grouped event (see gateway/supervise.py)."""

    min_devices: int = 10
    min_fraction: float = 0.2
    window_ms: int = 30_000
    restored_fraction: float = 0.8
    # an outage that grows is told again at most this often
    update_ms: int = 5_000

    def trips(self, count: int, district_size: int) -> bool:
        """`count` devices of a district of `district_size` offline within the window."""
        if count >= self.min_devices:
            return True
        # a share of a tiny district (one bell of three) is not yet a pattern
        return count >= MIN_OUTAGE_DEVICES and count >= self.min_fraction * district_size


# the fewest devices the share rule groups, whatever the district's size
MIN_OUTAGE_DEVICES = 3


class SuperviseConfig(_Section):
    # how often devices send a heartbeat (their device.toml `mqtt.heartbeat_s`)
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0
    # a device is offline after this many heartbeat intervals without a word from it
    missed: Annotated[int, Field(ge=1, le=100)] = 3
    # how often overdue devices are looked for
    tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    # after a device's last will, wait this long (at most half the silence timeout) for it
    # to reconnect before reporting it offline: a reset it recovers from is not an outage
    will_grace_s: Annotated[float, Field(ge=0, le=3600)] = 10.0
    # offline reports of one district become one `district_outage` event when at least
    # this many devices of it go offline within `outage_window_s`...
    outage_min_devices: Annotated[int, Field(ge=2)] = 10
    # ...or at least this share of the district's devices (and at least three)
    outage_min_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2
    outage_window_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # the outage ends (one `district_restored`) when this share of its devices is back
    outage_restored_fraction: Annotated[float, Field(gt=0, le=1)] = 0.8
    # an outage that grows is told again at most this often (at most half a heartbeat:
    # the rest of a district that went dark together follows within one interval)
    outage_update_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # false: every device's offline report goes out on its own, however many at once
    group_outages: bool = True

    @property
    def timeout_ms(self) -> int:
        return int(self.heartbeat_s * self.missed * 1000)

    @property
    def will_grace_ms(self) -> int:
        # at most half the silence timeout: a will must still tell an outage sooner
        return min(int(self.will_grace_s * 1000), self.timeout_ms // 2)

    def outage_rule(self) -> OutageRule | None:
        if not self.group_outages:
            return None
        return OutageRule(
            min_devices=self.outage_min_devices,
            min_fraction=self.outage_min_fraction,
            window_ms=int(self.outage_window_s * 1000),
            restored_fraction=self.outage_restored_fraction,
            update_ms=int(min(self.outage_update_s, self.heartbeat_s / 2) * 1000),
        )


class HealthConfig(_Section):
    # seconds between the probes the gateway sends itself through the broker (gateway/health.py)
    probe_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # no probe heard for this long: the intake is deaf (/healthz 503; repairs; gateway/health.py)
    intake_deaf_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    # a centre failing for this long is reported (/healthz degraded, still 200)
    centre_down_s: Annotated[float, Field(gt=0, le=3600)] = 15.0

    @model_validator(mode="after")
    def _hears_several(self) -> HealthConfig:
        if self.intake_deaf_s < 2 * self.probe_s:
            raise ValueError(
                f"health.intake_deaf_s ({self.intake_deaf_s:g}) must be at least twice"
                f" health.probe_s ({self.probe_s:g}): one late probe must not look deaf"
            )
        return self


def _check_districts(districts: list[str]) -> list[str]:
    return [check_district(d, allow_all=True) for d in districts]


class ApiToken(_Section):
    # who holds the token (a centre or an operator desk): shown in logs and stage history
    name: DeviceId
    # operator: alerts and devices; admin: also registers and revokes devices
    role: Literal["operator", "admin"] = "operator"
    # districts whose alerts, devices, video and personal data this token may see and act
    # on; ["*"] is the central centre, which sees all
    districts: Annotated[list[str], AfterValidator(_check_districts)] = ["*"]
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

    def sees(self, district: str) -> bool:
        return "*" in self.districts or district in self.districts

    @property
    def secret(self) -> str:
        return self._secret


class ApiConfig(_Section):
    # the operator HTTP API (acks, devices, alerts, metrics); off unless tokens are set
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8480
    # HTTPS: this server's certificate chain and key (PEM); bearer tokens must not cross a
    # network in clear, so set these unless the API stays on loopback or behind a proxy
    cert_file: Path | None = None
    key_file: Path | None = None
    # a client must send a request's head, and its body, within this many seconds
    read_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    tokens: list[ApiToken] = []

    @model_validator(mode="after")
    def _usable(self) -> ApiConfig:
        if self.enabled and not self.tokens:
            raise ValueError("the API is enabled but has no [[api.tokens]]: add at least one")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both api.cert_file and api.key_file for HTTPS, or neither")
        names = [t.name for t in self.tokens]
        if len(names) != len(set(names)):
            raise ValueError("two [[api.tokens]] share a name: give each its own")
        return self


class EnrolConfig(_Section):
    # the site folder `ansimi provision init-site` made: its CA signs enrolling devices'
    # certificates (POST /enrol, needs the API); unset means no enrolment here
    site_dir: Path | None = None


class PrivacyConfig(_Section):
    # the per-site data key sealing devices' personal data in the store: mode 0600, owned
    # by the service user, not in the same backup as the database
    key_file: Path = Path("/var/lib/ansimi/gateway/privacy.key")
    # under systemd, LoadCredential=<this>:/path wins over key_file
    credential: str = "privacy-key"
    # `ansimi gateway purge` deletes events closed longer ago than this; an alert that is
    # not closed is never purged; 0 keeps them forever
    closed_events_days: Annotated[float, Field(ge=0)] = 365.0


StepName = Annotated[str, StringConstraints(pattern=STEP_NAME_PATTERN)]


class ProcedureStepConfig(_Section):
    step: StepName  # its name in the API (POST /incidents/{id}/procedure/{step})
    ko: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    en: Annotated[str, StringConstraints(min_length=1, max_length=200)]


class ProcedureConfig(_Section):
    kind: IncidentKind
    steps: Annotated[list[ProcedureStepConfig], Field(min_length=1, max_length=32)]


class IncidentsConfig(_Section):
    # kind -> priority, 1 = highest; kinds not named keep the default order (docs/incidents.md)
    priorities: dict[IncidentKind, Annotated[int, Field(ge=1, le=1000)]] = {}
    # seconds an incident may stay unacknowledged before each escalation step: "default",
    # or a priority ("1") for that priority alone
    escalate_after_s: dict[str, Annotated[float, Field(gt=0)]] = {"default": 60.0}
    # centre names ([[centres]] or [[sia]]), in order; empty: no escalation
    escalation: list[str] = []
    # the checklist per kind; a kind not listed keeps the built-in one
    procedure: list[ProcedureConfig] = []

    @field_validator("escalate_after_s")
    @classmethod
    def _keys_are_priorities(cls, after: dict[str, float]) -> dict[str, float]:
        bad = [k for k in after if k != "default" and not k.isdigit()]
        if bad:
            raise ValueError(
                f'escalate_after_s keys are "default" or a priority such as "1", not {bad[0]!r}'
            )
        return after

    @model_validator(mode="after")
    def _one_procedure_per_kind(self) -> IncidentsConfig:
        kinds = [p.kind for p in self.procedure]
        if len(kinds) != len(set(kinds)):
            raise ValueError("two [[incidents.procedure]] share a kind: merge their steps")
        return self

    def priority_of_kind(self) -> dict[str, int]:
        """The configured priorities, by kind (the rest keep the default order)."""
        configured: dict[str, int] = {kind: p for kind, p in self.priorities.items()}
        return configured

    def after_s(self, priority: int) -> float:
        """Seconds before each escalation step of an incident of this priority."""
        return self.escalate_after_s.get(str(priority), self.escalate_after_s.get("default", 60.0))

    def procedures(self) -> dict[str, tuple[ProcedureStep, ...]]:
        configured: dict[str, tuple[ProcedureStep, ...]] = {
            p.kind: tuple(ProcedureStep(s.step, s.ko, s.en) for s in p.steps)
            for p in self.procedure
        }
        return {**DEFAULT_PROCEDURES, **configured}


class TestPressConfig(_Section):
    # a bell's test press not `received` (asked for) or not `delivered` within this long
    # becomes a test_failed maintenance event for its district (gateway/testwatch.py)
    complete_within_s: Annotated[float, Field(gt=0)] = 600.0
    # the devices' [test_press] every_days: a bell with no test for this long (and the time
    # above) is a test_failed at the link; 0: scheduled tests are not expected
    every_days: Annotated[int, Field(ge=0, le=28)] = 7


class FleetConfig(_Section):
    # a device whose heartbeat clock is this far off the gateway's is flagged (gateway/
    # fleethealth.py); below [intake] window_s, so it is found before its messages are
    clock_drift_flag_s: Annotated[float, Field(gt=0)] = 60.0
    # a certificate (device, site CA, the gateway's) this close to expiry and not renewed is
    # a cert_expiring event (gateway/certwatch.py; needs [enrol] site_dir)
    cert_warn_days: Annotated[float, Field(gt=0)] = 30.0
    # a device that reports another config than the one desired is sent it again at most
    # this often (gateway/remote_config.py); one that rolled that config back ignores it
    config_resend_after_s: Annotated[float, Field(gt=0)] = 600.0
    # the fleet view (GET /fleet) says a bell needs a visit below this battery charge
    low_battery_pct: Annotated[int, Field(ge=0, le=100)] = 20
    # ... or with this many messages waiting in its outbox (not received by the gateway)
    outbox_backlog: Annotated[int, Field(ge=1)] = 5


class UpdatesConfig(_Section):
    # the site's release public key (raw, base64url): bundles signed by any other key are
    # refused (gateway/rollout.py); empty: this gateway keeps no releases, runs no rollouts
    release_public_key: str = ""
    # where added bundles are kept (rollouts are in the store; a rollout.json here is imported)
    dir: Path = Path("/var/lib/ansimi/gateway/releases")
    # the API's address as devices reach it (https://host:port): the bundles' download URL
    public_url: str = ""
    # a rollout pauses by itself once this share of its devices failed (at least one)
    pause_failed_pct: Annotated[float, Field(gt=0, le=100)] = 10.0
    # a device offered the update that said nothing for this long is offered it again
    reoffer_s: Annotated[float, Field(gt=0)] = 600.0

    @model_validator(mode="after")
    def _reachable(self) -> UpdatesConfig:
        if self.release_public_key:
            try:
                public_key_from_b64(self.release_public_key)
            except Malformed as exc:
                raise ValueError(
                    f"[updates] release_public_key: {exc}; set it to what `ansimi provision "
                    "release key init` printed"
                ) from None
        if self.release_public_key and not self.public_url.startswith(("https://", "http://")):
            raise ValueError(
                "[updates] public_url: set it to the API's address as devices reach it "
                "(https://<host>:<port>), or leave release_public_key empty for no updates"
            )
        return self


class GatewayConfig(_Section):
    id: DeviceId = "gw-local"
    signing_key: Path = Path("/var/lib/ansimi/gateway/signing.key")
    # where the gateway's state lives, as a URL: sqlite:///<absolute path>, or
    # postgresql://user@host:port/db for gateways on several hosts
    store: str = ""
    # a postgresql:// store's password, in a file of mode 0600 (never in the URL); the
    # systemd credential `store-password` wins over it
    store_password_file: Path | None = None
    # the older spelling: a plain SQLite path, read as sqlite://<path> when `store` is unset
    database: Path = Path("/var/lib/ansimi/gateway/gateway.db")
    # free space kept for alerts on the database's file system: below it, a disk_low event
    disk_reserve_mb: Annotated[float, Field(ge=0)] = 64.0
    mqtt: MqttConfig = MqttConfig()
    uplink: UplinkConfig = UplinkConfig()
    intake: IntakeConfig = IntakeConfig()
    forward: ForwardConfig = ForwardConfig()
    supervise: SuperviseConfig = SuperviseConfig()
    api: ApiConfig = ApiConfig()
    enrol: EnrolConfig = EnrolConfig()
    video: VideoConfig = VideoConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    health: HealthConfig = HealthConfig()
    incidents: IncidentsConfig = IncidentsConfig()
    test_press: TestPressConfig = TestPressConfig()
    fleet: FleetConfig = FleetConfig()
    updates: UpdatesConfig = UpdatesConfig()
    centres: list[Centre] = []
    sia: list[SiaReceiver] = []

    @model_validator(mode="after")
    def _drift_flagged_inside_the_window(self) -> GatewayConfig:
        if self.fleet.clock_drift_flag_s >= self.intake.window_s:
            raise ValueError(
                f"[fleet] clock_drift_flag_s ({self.fleet.clock_drift_flag_s}) must be below"
                f" [intake] window_s ({self.intake.window_s}): a drift is flagged before the"
                " device's messages leave the replay window"
            )
        return self

    @model_validator(mode="after")
    def _one_store(self) -> GatewayConfig:
        if self.store and "database" in self.model_fields_set:
            raise ValueError(
                "`store` and `database` both name the gateway's store: keep `store` "
                f'(database = "{self.database}" is store = "{sqlite_url(self.database)}")'
            )
        if self.store:
            check_store_url(self.store)  # BadStoreUrl (a ValueError) names the fix
        return self

    @property
    def heartbeat_flush_ms(self) -> int:
        """[intake] heartbeat_flush_s, at most half the silence timeout less one heartbeat:
        the store's last-seen lags by up to this, and another instance's supervisor must not
        find silent a device this one heard and has yet to keep (`missed = 1`: none wait)."""
        s = self.supervise
        room_ms = s.timeout_ms - int(s.heartbeat_s * 1000)
        return min(int(self.intake.heartbeat_flush_s * 1000), max(0, room_ms // 2))

    @property
    def store_url(self) -> str:
        """The store's URL: `store`, or the plain `database` path older configs give."""
        return self.store or sqlite_url(self.database)

    @model_validator(mode="after")
    def _names_unique(self) -> GatewayConfig:
        names = [c.name for c in self.centres] + [s.name for s in self.sia]
        if len(names) != len(set(names)):
            raise ValueError(
                "two [[centres]] or [[sia]] share a name: give each centre its own name"
            )
        return self

    @model_validator(mode="after")
    def _escalation_names_centres(self) -> GatewayConfig:
        names = {c.name for c in self.centres} | {s.name for s in self.sia}
        unknown = [n for n in self.incidents.escalation if n not in names]
        if unknown:
            raise ValueError(
                f"incidents.escalation names {unknown[0]!r}, which is no [[centres]] or [[sia]]"
                f" name. Fix: use one of {', '.join(sorted(names)) or '(none configured)'}"
            )
        return self

    @model_validator(mode="after")
    def _every_district_routed(self) -> GatewayConfig:
        # an alert kept for a district nobody serves would be acked `received` and then
        # wait for nobody: refuse to start instead
        unrouted = [d for d in SEOUL_DISTRICTS if not self.centres_for(d)]
        if not unrouted:
            return self
        if len(unrouted) == len(SEOUL_DISTRICTS):
            where = "any district"
        else:
            where = ", ".join(unrouted[:5])
            where += f" (and {len(unrouted) - 5} more)" if len(unrouted) > 5 else ""
        raise ValueError(
            f"[[centres]] and [[sia]]: none serves {where}, so alerts from there would be "
            "acked and go nowhere. Fix: add the "
            'central centre ([[centres]] with districts = ["*"]; see '
            "gateway/routing.example.toml), or a centre for each district"
        )

    def centres_for(self, district: str) -> tuple[str, ...]:
        return routes_for([*self.centres, *self.sia], district)


def routes_for(centres: Sequence[Centre | SiaReceiver], district: str) -> tuple[str, ...]:
    """The names of the centres that get a district's events."""
    return tuple(c.name for c in centres if c.serves(district))
