"""Remote configuration on the device: check, keep, try, then confirm or roll back.

The gateway's signed `set_config` command carries the whole remote part of the config (a
patch of sections and keys, protocol/remote_config.py). The device

1. refuses a key it does not take remotely, or a patch its own config model refuses once
   laid over device.toml (the same pydantic model that checks device.toml at start-up);
2. keeps the patch as a *trial* beside the last good one (`remote-config.json` in the state
   folder, written atomically) and applies it;
3. confirms it once the gateway acknowledges (`received`) a `config_applied` report sent
   under it (on a connection made after the change, when the change touched the link): the
   broker's PUBACK would prove only that the broker heard the bell. Otherwise it rolls back
   to the last good patch after `[remote_config] confirm_within_s`. An agent that restarts
   during a trial starts on the last good patch: the trial may be why it stopped.

A failure (not confirmed in time, or a restart during the trial) may have nothing to do
with the config (a power cut, the gateway away for a while), so a config is tried again
when the gateway sends it again; after its second failure in a row it is refused
(`MAX_FAILURES`) until another config is proven.

device.toml stays the installer's; the patch lies over it at every start. This module does
no I/O but its one file, and takes time as an argument (`now_ms`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from ansimi.files import write_atomic
from device.config import DeviceConfig
from device.errors import DeviceError
from protocol.remote_config import (
    CONFIG_PATCH,
    config_hash,
    refused_key,
    without_sealed_numbers,
)
from protocol.sealed_numbers import BadNumbers, open_numbers

log = logging.getLogger(__name__)

STATE_FILE: Final = "remote-config.json"

# sections whose change needs the MQTT link made again with the new settings
LINK_SECTIONS: Final = frozenset({"mqtt", "link"})
# failures of one config before it is refused: one may be bad luck, two are the config
MAX_FAILURES: Final = 2

Patch = dict[str, dict[str, Any]]


class ConfigRefused(DeviceError, ValueError):
    """A remote config this device will not run; the message says which key and why."""


class SealedForAnotherKey(ConfigRefused):
    """SMS numbers the gateway sealed to another key than this device's (or no key here to
    open them)."""


class ConfigFailedBefore(ConfigRefused):
    """A config that failed here `MAX_FAILURES` times in a row: not tried again (the gateway
    sends a drifting device its config now and then; a broken one must not cut the bell
    each time)."""


def overlay(
    base: DeviceConfig, patch: Patch, device_key: Ed25519PrivateKey | None = None
) -> DeviceConfig:
    """`base` with `patch` laid over it, checked by the config model, the SMS numbers the
    gateway sealed for this device opened with `device_key`; raises ConfigRefused."""
    why_not = refused_key(patch)
    if why_not is not None:
        raise ConfigRefused(why_not)
    merged = base.model_dump(mode="json")
    for section, keys in patch.items():
        merged[section] = {**merged[section], **keys}
    try:
        config = DeviceConfig.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        # the message only: pydantic's `input` could be an SMS number in another section
        raise ConfigRefused(f"{where}: {first['msg']}") from None
    sealed = config.sms.numbers_from_gateway
    if not sealed:
        return config
    if device_key is None:
        raise SealedForAnotherKey("sms.numbers_from_gateway: no device key here to open them")
    try:
        numbers = open_numbers(sealed, device_key)
    except BadNumbers as exc:
        raise SealedForAnotherKey(f"sms.numbers_from_gateway: {exc}") from None
    # in memory only: the state file keeps the sealed value
    return config.model_copy(update={"sms": config.sms.model_copy(update={"numbers": numbers})})


def touches_link(old: Patch, new: Patch) -> bool:
    return any(old.get(section) != new.get(section) for section in LINK_SECTIONS)


@dataclass(frozen=True)
class Trial:
    patch: Patch
    started_ms: int
    # the agent's count of connections when it began: a link change is proven only on a
    # connection made after it
    connects: int
    link_changed: bool


class RemoteConfig:
    """The device's remote config: the last good patch and the one on trial, if any."""

    def __init__(
        self,
        base: DeviceConfig,
        *,
        durable: bool = True,
        device_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self.base = base  # device.toml, as loaded
        self._device_key = device_key  # opens the SMS numbers the gateway sealed for it
        self._path = base.device.state_dir / STATE_FILE
        self._durable = durable
        self.good: Patch = {}
        self.trial: Trial | None = None
        self.failed: str | None = None  # the hash of the last config that failed
        self.failures = 0  # how many times in a row it failed
        # a trial found at start-up (the agent stopped during it): undone, to be reported
        self.abandoned: Patch | None = None
        self._load()

    @property
    def patch(self) -> Patch:
        """The patch running now."""
        return self.trial.patch if self.trial is not None else self.good

    @property
    def hash(self) -> str:
        return config_hash(self.patch)

    def effective(self) -> DeviceConfig:
        return overlay(self.base, self.patch, self._device_key)

    def begin(self, patch: Patch, *, now_ms: int, connects: int) -> DeviceConfig:
        """Check `patch`, keep it as the trial and return the config to run; a trial still
        open is dropped for the new one (the last good stays what a rollback returns to)."""
        patch = CONFIG_PATCH.validate_python(patch)
        if self.blocked(config_hash(patch)):
            raise ConfigFailedBefore(f"config {self.failed} failed here {self.failures} times")
        config = overlay(self.base, patch, self._device_key)
        self.trial = Trial(patch, now_ms, connects, touches_link(self.patch, patch))
        self._save()
        return config

    def blocked(self, patch_hash: str) -> bool:
        """The config failed too often here to be tried again."""
        return patch_hash == self.failed and self.failures >= MAX_FAILURES

    def _count_failure(self, patch: object) -> None:
        patch_hash = config_hash(patch) if isinstance(patch, dict) else None
        self.failures = self.failures + 1 if patch_hash == self.failed else 1
        self.failed = patch_hash

    def proven(self, *, connects: int) -> bool:
        """A report sent now with `connects` connections so far would prove the trial."""
        trial = self.trial
        return trial is not None and (not trial.link_changed or connects > trial.connects)

    def commit(self) -> None:
        if self.trial is not None:
            # another config proven: the one that failed may be tried again when sent
            self.good, self.trial, self.failed, self.failures = self.trial.patch, None, None, 0
            self._save()

    def overdue(self, now_ms: int, confirm_within_s: float) -> bool:
        trial = self.trial
        return trial is not None and now_ms - trial.started_ms >= confirm_within_s * 1000

    def rollback(self) -> DeviceConfig:
        """Back to the last good patch; returns its config."""
        if self.trial is not None:
            self._count_failure(self.trial.patch)
        self.trial = None
        self._save()
        return self.effective()

    # ---- the file -------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            raw = json.loads(self._path.read_bytes())
            self.good = self._opened(CONFIG_PATCH.validate_python(raw.get("good", {})))
            trial = raw.get("trial")
            failed = raw.get("failed")
            self.failed = failed if isinstance(failed, str) else None
            failures = raw.get("failures", 1)  # a file from before counting: one failure
            self.failures = failures if isinstance(failures, int) and self.failed else 0
        except FileNotFoundError:
            return
        except (ValueError, AttributeError, ConfigRefused) as exc:
            # device.toml may have changed under it, or the file is damaged: run device.toml
            log.warning(
                "device %s: %s unusable (%s): running device.toml alone until the gateway "
                "sends the config again",
                self.base.device.id,
                self._path,
                exc,
            )
            self.good = {}
            return
        if trial is not None:
            self.abandoned = trial
            self._count_failure(trial)
            self._save()

    def _opened(self, good: Patch) -> Patch:
        """The last good patch, checked; its SMS numbers left out if this device's key no
        longer opens them (`ansimi provision device rotate` gave it a new one). The rest of
        it still runs: silent mode, timings and the broker are not the key's business. The
        numbers are lost with the old key (the gateway never kept them either): the SMS
        fallback uses device.toml's own until an admin sets them again, and the gateway,
        seeing the new key, wants the same patch without them (its drift says
        `numbers_needed`), so the two agree and nothing is resent."""
        try:
            overlay(self.base, good, self._device_key)
        except SealedForAnotherKey:
            good = without_sealed_numbers(good)
            overlay(self.base, good, self._device_key)
            log.warning(
                "device %s: the SMS numbers the gateway sealed do not open with this "
                "device's key (rotated?): running the rest of the remote config, and "
                "device.toml's numbers, until the gateway sends them again",
                self.base.device.id,
            )
        return good

    def _save(self) -> None:
        trial = None
        if self.trial is not None:
            trial = self.trial.patch
        state = {
            "good": self.good,
            "trial": trial,
            "failed": self.failed,
            "failures": self.failures,
        }
        data = json.dumps(state, sort_keys=True).encode()
        write_atomic(self._path, data, mode=0o600, durable=self._durable)
