"""Remote configuration on the wire: a partial device config, its layers and its hash.

The gateway keeps what each device should run as layers (the site's defaults, then its
district's, then its own: the later wins key by key), sends the merged patch in a signed
`set_config` command, and compares the hash it expects with the one the device reports in
its heartbeat. Both sides hash the same JSON object the same way, here: that is the drift.
The device checks the patch against its own config model (`device/remote_config.py`); here
it is only a bounded object of sections of keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Final, TypeAlias

from pydantic import BeforeValidator, Field, StringConstraints, TypeAdapter


def _not_an_int(value: object) -> object:
    if isinstance(value, int):
        raise ValueError("integers must fit in 64 bits")
    return value


ConfigKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
ConfigText = Annotated[str, StringConstraints(max_length=256)]
# Order matters, as for command arguments: a JSON true stays a bool, a JSON 1 an int.
ConfigValue: TypeAlias = (
    bool
    | Annotated[int, Field(ge=-(2**63), lt=2**63)]
    | Annotated[float, Field(allow_inf_nan=False), BeforeValidator(_not_an_int)]
    | ConfigText
    | Annotated[list[ConfigText], Field(max_length=8)]
)
# {"behaviour": {"long_press_s": 2.5}, "mqtt": {"heartbeat_s": 30.0}}
ConfigPatch: TypeAlias = Annotated[
    dict[ConfigKey, Annotated[dict[ConfigKey, ConfigValue], Field(max_length=24)]],
    Field(max_length=12),
]
CONFIG_PATCH: TypeAdapter[dict[str, dict[str, ConfigValue]]] = TypeAdapter(ConfigPatch)


# What the gateway may set, by section: part of the contract, so the gateway refuses at once
# what every device would. Not the device's identity, keys, state folder or hardware (a wrong
# pin is a visit), nor SMS numbers in clear: only sealed to the device by the gateway
# (`numbers_from_gateway`, protocol/sealed_numbers.py). The broker's
# address is here on purpose: moving a fleet to another broker is the change a rollback
# exists for. The values are the device's config model's to judge.
REMOTE_KEYS: Final[dict[str, frozenset[str]]] = {
    "device": frozenset({"silent", "discreet_led"}),
    "mqtt": frozenset({"host", "port", "heartbeat_s"}),
    "link": frozenset({"ack_timeout_s", "other_brokers"}),
    "outbox": frozenset({"resend_min_s", "resend_max_s"}),
    "behaviour": frozenset({"long_press_s", "cancel_hold_s", "duress_hold_s", "ring_link_s"}),
    "sms": frozenset({"after_s", "undelivered_after_s", "mode", "numbers_from_gateway"}),
    "test_press": frozenset(
        {"enabled", "every_days", "from_hour", "until_hour", "timezone", "complete_within_s"}
    ),
}


def refused_key(patch: Mapping[str, Mapping[str, object]]) -> str | None:
    """Why `patch` names a key that cannot be set remotely, or None."""
    for section, keys in patch.items():
        allowed = REMOTE_KEYS.get(section)
        if allowed is None:
            return f"[{section}] cannot be set remotely"
        for key in keys:
            if key not in allowed:
                return f"[{section}] {key} cannot be set remotely"
    return None


def merge_layers(
    layers: Iterable[Mapping[str, Mapping[str, object]]],
) -> dict[str, dict[str, object]]:
    """The patch a device should run: each layer's keys over the earlier layers'."""
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for section, keys in layer.items():
            merged.setdefault(section, {}).update(keys)
    return {section: keys for section, keys in merged.items() if keys}


def config_hash(patch: Mapping[str, Mapping[str, object]]) -> str:
    """SHA-256 of the patch as canonical JSON (sorted keys, no spaces); {} for none."""
    canonical = json.dumps(patch, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# the key that carries SMS numbers sealed to one device's key (protocol/sealed_numbers.py)
SEALED_NUMBERS: Final = ("sms", "numbers_from_gateway")


def without_sealed_numbers(
    patch: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, object]]:
    """`patch` without `[sms] numbers_from_gateway` (a section left empty goes too): what a
    device runs, and the gateway wants it to run, once its key was rotated after its numbers
    were sealed. Both sides drop it the same way, so their hashes still agree."""
    return merge_layers(
        [
            {
                section: {k: v for k, v in keys.items() if (section, k) != SEALED_NUMBERS}
                for section, keys in patch.items()
            }
        ]
    )
