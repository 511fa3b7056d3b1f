"""The device's configuration: `/etc/ansimi/device.toml`, validated by pydantic.

`device/device.example.toml` explains every option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ansimi.config import BrokerAddresses, broker_addresses
from ansimi.testpress import TestPressSchedule
from device.hal.config import HardwareConfig
from device.video.config import VideoConfig
from protocol.ids import DeviceId
from protocol.messages import DeviceKind
from protocol.sealed_numbers import PHONE_NUMBER, SEALED_CHARS


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceSection(_Section):
    id: DeviceId = "bell-unset"
    kind: DeviceKind = "bell"
    # the Ed25519 key made on this device at enrolment; never copied off it
    key_file: Path = Path("/var/lib/ansimi/device/device.key")
    # the AES key sealing this device's personal data (the SMS numbers); 0600, made on
    # first use by `ansimi device set-sms-numbers`
    data_key_file: Path = Path("/var/lib/ansimi/device/privacy.key")
    state_dir: Path = Path("/var/lib/ansimi/device")
    # no sound and no light an attacker could see; a store bell is silent unless told otherwise
    silent: bool | None = None
    # in silent mode, may a dim LED confirm that help is coming?
    discreet_led: bool = False
    # no longer read: heartbeats report the agent version that runs (device/update.py's
    # agent_version); still accepted, so that a device.toml that sets it loads
    firmware: Annotated[str, Field(max_length=64)] | None = None

    @property
    def is_silent(self) -> bool:
        return self.kind == "store" if self.silent is None else self.silent


class GatewaySection(_Section):
    id: DeviceId = "gw-local"
    # the gateway's Ed25519 public key (raw, base64url), received at enrolment
    public_key: str = ""


class MqttSection(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    version: Literal[5, 311] = 5
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    heartbeat_s: Annotated[float, Field(gt=0)] = 10.0


class LinkSection(_Section):
    """How the MQTT link finds out it is dead (`ansimi/mqtt.py`, LinkWatch)."""

    # an alert, cancel or duress without its PUBACK this long makes the link test itself
    # (PINGREQ); no answer within as long again and it is dropped and connected again
    ack_timeout_s: Annotated[float, Field(gt=0)] = 3.0
    # further brokers, "host:port", tried in turn after [mqtt] host and port
    other_brokers: BrokerAddresses = []

    def other_addresses(self) -> tuple[tuple[str, int], ...]:
        return broker_addresses(self.other_brokers)


class OutboxSection(_Section):
    # first resend after this long without a `received` ack; doubles up to the maximum
    resend_min_s: Annotated[float, Field(gt=0)] = 2.0
    resend_max_s: Annotated[float, Field(gt=0)] = 30.0


class BehaviourSection(_Section):
    """What a press means; `device/behaviour.py` explains the gestures."""

    # holding the emergency button this long marks the alert urgent
    long_press_s: Annotated[float, Field(gt=0)] = 3.0
    # during an alert, holding the button this long and letting go sends `cancel`
    cancel_hold_s: Annotated[float, Field(gt=0)] = 10.0
    # keeping it held on to this long instead sends `duress`, while looking like a cancel
    duress_hold_s: Annotated[float, Field(gt=0)] = 15.0
    # an emergency this soon after a doorbell ring is linked to the ring
    ring_link_s: Annotated[float, Field(ge=0)] = 120.0

    @model_validator(mode="after")
    def _holds_in_order(self) -> BehaviourSection:
        # each gesture is a longer hold than the one before: otherwise one would hide another
        if not self.long_press_s < self.cancel_hold_s < self.duress_hold_s:
            raise ValueError(
                "hold times must grow: long_press_s < cancel_hold_s < duress_hold_s "
                f"(got {self.long_press_s:g}, {self.cancel_hold_s:g}, {self.duress_hold_s:g})"
            )
        return self


# E.164-like, as the modem driver checks: an optional + and 3 to 16 digits.


class SmsSection(_Section):
    # an alert the gateway has not `received` this long after the press goes out by SMS as
    # well, whatever the link seems to be (a black-holed link looks up for a while)
    after_s: Annotated[float, Field(gt=0)] = 15.0
    # an alert `received` but not `delivered` to a centre this long after the press goes out
    # by SMS too, even while the link is up (the gateway may have no way to a centre)
    undelivered_after_s: Annotated[float, Field(gt=0)] = 30.0
    # "pdu": in Korean (UCS-2, concatenated parts); "text": English ASCII in GSM text mode
    mode: Literal["pdu", "text"] = "pdu"
    # who gets the SMS (personal data: never logged); empty means no SMS fallback
    numbers: Annotated[list[str], Field(max_length=8)] = []
    # the same, sealed with device.data_key_file (`ansimi device set-sms-numbers` writes
    # it): the file then holds no number in clear. When set, it wins over `numbers`.
    numbers_sealed: Annotated[str, Field(max_length=4096)] = ""
    # the numbers the gateway sealed to this device's key (a device's own config layer;
    # protocol/sealed_numbers.py): opened in memory with device.key_file, they win over both
    numbers_from_gateway: Annotated[str, Field(max_length=SEALED_CHARS)] = ""

    @model_validator(mode="after")
    def _numbers_valid(self) -> SmsSection:
        # Checked here, not per item: a per-item error would quote the number in the
        # start-up error, and so in the journal. This one names its position only.
        for position, number in enumerate(self.numbers, start=1):
            if not PHONE_NUMBER.fullmatch(number):
                raise ValueError(
                    f"numbers: entry {position} of {len(self.numbers)} is not a phone number "
                    "in international form (+ then 3 to 16 digits, no spaces)"
                )
        return self


class RenewSection(_Section):
    """Certificate self-renewal (`device/renew.py`)."""

    # the gateway's HTTPS API (`ansimi device enrol` writes it); empty: no self-renewal
    gateway_url: Annotated[str, Field(max_length=200)] = ""
    # renew this many days before the certificate expires
    before_days: Annotated[float, Field(gt=0)] = 30.0
    # look this often; a failed renewal is tried again at the next look
    check_every_s: Annotated[float, Field(gt=0)] = 21_600.0


class RemoteConfigSection(_Section):
    """How a config sent by the gateway is tried (`device/remote_config.py`)."""

    # a new remote config the gateway has not acknowledged (its config_applied report
    # `received`) within this long is undone
    confirm_within_s: Annotated[float, Field(gt=0)] = 120.0


class UpdateSection(_Section):
    # empty: this device takes no agent updates (an `update` command is ignored)
    root: Path | None = None
    release_public_key: str = ""
    trial_s: Annotated[float, Field(gt=0, le=3600)] = 120.0
    max_trial_boots: Annotated[int, Field(ge=1, le=20)] = 3

    @model_validator(mode="after")
    def _key_with_root(self) -> UpdateSection:
        if self.root is not None and not self.release_public_key:
            raise ValueError(
                "[update] root is set but release_public_key is empty: set it to the site's "
                "release public key (`ansimi provision release key init` prints it)"
            )
        return self


class DeviceConfig(_Section):
    device: DeviceSection = DeviceSection()
    gateway: GatewaySection = GatewaySection()
    mqtt: MqttSection = MqttSection()
    link: LinkSection = LinkSection()
    outbox: OutboxSection = OutboxSection()
    behaviour: BehaviourSection = BehaviourSection()
    sms: SmsSection = SmsSection()
    hardware: HardwareConfig = HardwareConfig()
    video: VideoConfig = VideoConfig()
    test_press: TestPressSchedule = TestPressSchedule()
    remote_config: RemoteConfigSection = RemoteConfigSection()
    renew: RenewSection = RenewSection()
    update: UpdateSection = UpdateSection()

    @model_validator(mode="after")
    def _store_bells_stay_silent(self) -> DeviceConfig:
        # a store bell is pressed during a robbery: a voice from it would endanger the clerk
        for option in ("talkback", "microphone"):
            if self.device.kind == "store" and getattr(self.video, option):
                raise ValueError(
                    f"[video] {option}: a store bell is silent and never has talk-back "
                    f"or a microphone; remove `{option} = true`"
                )
        return self
