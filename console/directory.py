"""Who the devices are: keys, labels, kinds and districts, synced from the gateway.

The receiver needs each device's public key to check the device's own signature, and the
page needs a label, a kind and a district. The gateway's registry is the one source:
`GET /devices?keys=1` with the console's operator token, fetched every `every_s` seconds
and at once when an event names a device we do not know (it may have been enrolled a
second ago). The last good copy is kept in the console's SQLite file, so a console
restarted while the gateway is unreachable still verifies. Only those fields are kept: a
device's address is personal data, fetched per view from the gateway
(`GET /devices/{id}/private`) and never stored here (docs/privacy.md).

Status events (online, offline) are signed by the gateway itself; its public keys come
from the console's configuration (`--gateway-key ID=KEY`), never from the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.files import private_database
from protocol.errors import Malformed
from protocol.keys import public_key_from_b64

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[list[dict[str, Any]]]]
# A device timestamp up to this far from the gateway's clock (`[intake] window_s` default)
# comes unflagged: a message it accepted just before a revocation may be dated up to this
# later. Further off, the gateway flags it with `clock_skew_ms`, and the receiver passes
# the gateway's own time of receipt instead (the signed time minus the skew).
INTAKE_WINDOW_MS = 300_000


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str
    kind: str
    district: str
    label: str
    revoked: bool
    public_key: str | None
    # gateway clock at revocation; None if not revoked or if the gateway did not keep it
    revoked_ms: int | None = None


KEPT_FIELDS = ("id", "kind", "district", "label", "revoked", "revoked_ms", "public_key")


def _info(raw: Mapping[str, Any]) -> DeviceInfo | None:
    device_id = raw.get("id")
    if not isinstance(device_id, str):
        return None
    key = raw.get("public_key")
    revoked_ms = raw.get("revoked_ms")
    return DeviceInfo(
        device_id=device_id,
        kind=str(raw.get("kind", "")),
        district=str(raw.get("district", "")),
        label=str(raw.get("label", "")),
        revoked=bool(raw.get("revoked", False)),
        public_key=key if isinstance(key, str) else None,
        revoked_ms=revoked_ms if type(revoked_ms) is int else None,
    )


class Directory:
    """The console's copy of the gateway's device registry."""

    def __init__(
        self,
        db_path: Path | str,
        fetch: Fetch | None,
        *,
        gateway_keys: Mapping[str, Ed25519PublicKey] | None = None,
        every_s: float = 30.0,
        min_refresh_gap_s: float = 2.0,
    ) -> None:
        self._db = sqlite3.connect(private_database(db_path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS directory (device_id TEXT PRIMARY KEY, data TEXT)"
        )
        self._fetch = fetch
        self.gateway_keys = dict(gateway_keys or {})
        self.every_s = every_s
        self._min_gap_s = min_refresh_gap_s
        self._devices: dict[str, DeviceInfo] = {}
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._lock = asyncio.Lock()
        self._last_sync = -float("inf")
        self.synced_ok = False
        self.last_error: str | None = None
        rows = self._db.execute("SELECT data FROM directory").fetchall()
        self._install([json.loads(r[0]) for r in rows], persist=False)

    # ---- reads ------------------------------------------------------------------------

    def get(self, device_id: str) -> DeviceInfo | None:
        return self._devices.get(device_id)

    def __len__(self) -> int:
        return len(self._devices)

    def key_for(self, kid: str) -> Ed25519PublicKey:
        """A `protocol.jws.verify` resolver: a device's key, or a configured gateway's.

        A revoked device's key too: what it signed before its revocation was accepted by
        the gateway then, and may still be on its way (a centre that was down). Whether a
        message is from before is the receiver's check (`signed_before_revocation`)."""
        if kid in self.gateway_keys:
            return self.gateway_keys[kid]
        key = self._keys.get(kid)
        if key is None:
            raise KeyError(kid)
        return key

    def knows(self, kid: str) -> bool:
        return kid in self.gateway_keys or kid in self._keys

    def signed_before_revocation(self, device_id: str, signed_ts_ms: int) -> bool:
        """False for a revoked device unless the message is from before its revocation:
        `signed_ts_ms` is the device's time as the gateway received it (corrected by the
        skew the gateway flagged), allowing the window within which clocks go unflagged."""
        info = self._devices.get(device_id)
        if info is None or not info.revoked:
            return True
        if info.revoked_ms is None:
            return False  # revoked at a time nobody kept: nothing can be shown to be before
        return signed_ts_ms <= info.revoked_ms + INTAKE_WINDOW_MS

    # ---- sync -------------------------------------------------------------------------

    async def sync(self, *, force: bool = True) -> bool:
        """Fetch the registry now; False if the gateway could not be asked.

        Without `force`, a sync within `min_refresh_gap_s` of the last good one is
        skipped, so a flood of events from unknown signers cannot turn into a flood of
        registry reads. After a failed sync (the gateway was not up yet) the next is not
        held back: the lock still lets only one run at a time.
        """
        if self._fetch is None:
            return False
        async with self._lock:
            now = time.monotonic()
            if not force and self.synced_ok and now - self._last_sync < self._min_gap_s:
                return True
            self._last_sync = now
            try:
                raw = await self._fetch()
            except Exception as exc:  # any failure: keep the cached copy, say why
                self.synced_ok = False
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("directory: registry sync failed: %s", self.last_error)
                return False
            self._install(raw, persist=True)
            self.synced_ok = True
            self.last_error = None
            return True

    async def run(self) -> None:
        """Sync every `every_s` seconds until cancelled."""
        while True:
            await self.sync()
            await asyncio.sleep(self.every_s)

    def _install(self, fetched: list[dict[str, Any]], *, persist: bool) -> None:
        # whatever else a registry answer carries is not ours to keep
        raw = [
            {k: item[k] for k in KEPT_FIELDS if k in item}
            | ({"id": item["device_id"]} if "device_id" in item else {})
            for item in fetched
        ]
        devices: dict[str, DeviceInfo] = {}
        keys: dict[str, Ed25519PublicKey] = {}
        for item in raw:
            info = _info(item)
            if info is None:
                continue
            devices[info.device_id] = info
            if info.public_key is not None:
                try:
                    keys[info.device_id] = public_key_from_b64(info.public_key)
                except Malformed:
                    log.warning("directory: %s has a malformed public key", info.device_id)
        keys_missing = [d for d in devices if d not in keys and not devices[d].revoked]
        if keys_missing and persist:
            log.warning(
                "directory: the registry gave no public key for %d device(s) (e.g. %s): "
                "the gateway must answer GET /devices?keys=1 with public_key",
                len(keys_missing),
                keys_missing[0],
            )
        self._devices = devices
        self._keys = keys
        if persist:
            with contextlib.closing(self._db.cursor()) as cursor:
                cursor.execute("BEGIN")
                cursor.execute("DELETE FROM directory")
                cursor.executemany(
                    "INSERT INTO directory VALUES (?, ?)",
                    [(d, json.dumps(r)) for r in raw if isinstance(d := r.get("id"), str)],
                )
                cursor.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
