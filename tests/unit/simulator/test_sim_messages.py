"""The run and its workers' messages: what one end writes, the other parses, or refuses by name."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from simulator.messages import (
    COMMAND,
    WORKER_LINE,
    AckSeen,
    Damage,
    Member,
    Progress,
    Sent,
    WorkerSpec,
    encode,
)
from simulator.scenario import DeviceSettings


def test_a_progress_line_round_trips_with_its_records() -> None:
    line = Progress(
        at=1.5,
        connected=3,
        sent=[Sent("alert-1", "sim-bell-00001", "alert", "press", 1.25)],
        acks=[AckSeen("alert-1", "received", 1.4)],
    )
    parsed = WORKER_LINE.validate_json(encode(line))
    assert parsed == line
    assert isinstance(parsed, Progress) and parsed.sent[0].trigger == "press"


def test_a_command_round_trips_and_a_bad_one_is_refused_by_name() -> None:
    damage = Damage(mode="corrupt", down_s=2.0, device_ids=["sim-bell-00001"])
    assert COMMAND.validate_json(encode(damage)) == damage
    with pytest.raises(ValidationError, match="mode"):
        COMMAND.validate_json(b'{"kind":"damage","mode":"burn","down_s":1,"device_ids":[]}')
    with pytest.raises(ValidationError, match="stages"):
        COMMAND.validate_json(b'{"kind":"stop","stages":1}')  # a field nobody reads


def test_a_spec_without_device_settings_gets_the_devices_defaults() -> None:
    # the fleet bench once wrote its own settings and left one out: a KeyError in the worker
    spec = WorkerSpec.model_validate_json(
        WorkerSpec(
            broker_host="127.0.0.1",
            broker_port=1883,
            gateway_id="gw-bench",
            gateway_public_key="k",
            run_secret="s",
            seed=1,
            state_dir="/tmp/x",
            device=DeviceSettings(heartbeat_s=5),
            devices=[Member("bench-00000", "bell", "mapo")],
            connect_timeout_s=10,
        ).model_dump_json()
    )
    assert spec.device.heartbeat_s == 5
    assert spec.device.sms_after_s == DeviceSettings().sms_after_s
