"""The device's personal data: its SMS fallback numbers, sealed in device.toml; and wiping.

`ansimi device set-sms-numbers` seals the numbers (one AES-GCM value for the whole list,
so not even their count shows) with the device's own data key, `device.data_key_file`,
and rewrites device.toml with `numbers = []` and `numbers_sealed`. The agent opens them
in memory at start. The associated data names the file, the key and the device, so a
sealed value copied from another bell's config does not open here.

`ansimi device wipe` removes what would tell a finder of the device who it protected:
its keys, its config and its outbox.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ansimi.privacy import Keyring, load_keyring, load_or_create
from device.config import DeviceConfig
from device.errors import DeviceError
from protocol import sealed_numbers

PLACE_TABLE = "device.toml"
PLACE_COLUMN = "sms.numbers"
SET_HINT = "ansimi device set-sms-numbers"


class DevicePrivacyError(DeviceError, ValueError):
    """Numbers that cannot be sealed or opened; the message names the file and the fix."""


def _place(config: DeviceConfig) -> dict[str, str]:
    return {"table": PLACE_TABLE, "column": PLACE_COLUMN, "row": config.device.id}


def check_numbers(numbers: Sequence[str]) -> list[str]:
    """The numbers, stripped; an error names a bad one by position, never by value."""
    try:
        return sealed_numbers.check_numbers([n.strip() for n in numbers if n.strip()])
    except sealed_numbers.BadNumbers as exc:
        raise DevicePrivacyError(str(exc)) from None


def seal_numbers(config: DeviceConfig, numbers: Sequence[str], keyring: Keyring) -> DeviceConfig:
    """`config` with the numbers sealed and no number in clear."""
    sealed = keyring.seal(json.dumps(list(numbers)), **_place(config)) if numbers else ""
    # model_copy, not a new section: every other [sms] option stays as it was
    sms = config.sms.model_copy(update={"numbers": [], "numbers_sealed": sealed})
    return config.model_copy(update={"sms": sms})


def with_sms_numbers(config: DeviceConfig) -> DeviceConfig:
    """`config` with its sealed numbers opened into `sms.numbers`, in memory only."""
    if not config.sms.numbers_sealed:
        return config
    key_file = config.device.data_key_file
    try:
        keyring = load_keyring(key_file, init_hint=SET_HINT)
        opened = json.loads(keyring.open(config.sms.numbers_sealed, **_place(config)))
    except (OSError, ValueError) as exc:
        raise DevicePrivacyError(
            f"sms.numbers_sealed cannot be opened with {key_file}: {exc}. Fix: restore that "
            f"key file, or enter the numbers again with `{SET_HINT}`"
        ) from None
    sms = config.sms.model_copy(update={"numbers": check_numbers(opened)})
    return config.model_copy(update={"sms": sms})


def set_sms_numbers(config_path: Path, config: DeviceConfig, numbers: Sequence[str]) -> int:
    """Seal `numbers` (made with the data key, created on first use) into `config_path`."""
    # imported here: enrolment's helpers pull in HTTP and PKI code the agent does not need
    from device.enrol import install, render_config

    cleaned = check_numbers(numbers)
    keyring = load_or_create(config.device.data_key_file)
    sealed = seal_numbers(config, cleaned, keyring)
    mode = config_path.stat().st_mode & 0o777 if config_path.exists() else 0o640
    # the rendered file says its defaults out loud; comments of a hand-written one go
    install([(config_path, render_config(sealed).encode(), mode & 0o750)])
    return len(cleaned)


@dataclass(frozen=True, slots=True)
class Wiped:
    removed: list[Path]
    absent: list[Path]


def wipe_targets(config_path: Path, config: DeviceConfig) -> list[Path]:
    """What `wipe` removes: keys, config and outbox (with its SQLite side files)."""
    outbox = config.device.state_dir / "outbox.db"
    targets = [
        config.device.key_file,
        config.device.data_key_file,
        config_path,
        outbox,
        outbox.with_name("outbox.db-wal"),
        outbox.with_name("outbox.db-shm"),
    ]
    if config.mqtt.key_file is not None:
        targets.append(config.mqtt.key_file)  # the TLS key: a copy could pose as this bell
    return list(dict.fromkeys(targets))


def wipe(config_path: Path, config: DeviceConfig) -> Wiped:
    removed: list[Path] = []
    absent: list[Path] = []
    for path in wipe_targets(config_path, config):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            absent.append(path)
    return Wiped(removed, absent)
