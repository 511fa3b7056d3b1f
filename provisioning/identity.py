"""What `ansimi provision device check --device-config` needs from a device's config, and
how it gets it: the composition (the `ansimi` command) hands in the device's own loader, so
provisioning does not import the device. Light on purpose: the command imports it on every run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What `check_device` needs from a device's config: who it is and how it connects."""

    device_id: str
    key_file: Path  # the Ed25519 signing key, whose public half the gateway registered
    broker: tuple[str, int]
    ca_file: Path | None
    cert_file: Path | None
    tls_key_file: Path  # the key of `cert_file` (the signing key unless mqtt.key_file says)


# Reads a device.toml into a DeviceIdentity; raises ansimi.config.ConfigError
DeviceIdentityLoader = Callable[[Path], DeviceIdentity]
# where the composition (the `ansimi` command) puts its DeviceIdentityLoader in click's meta
DEVICE_IDENTITY_LOADER: Final = "ansimi.device_identity_loader"
