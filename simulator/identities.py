"""Simulated device identities: each bell's Ed25519 key, and its entry in the gateway's registry.

The one place the simulator registers devices. Provisioning does not yet offer a
device-add function, so `register` writes straight into the gateway's store (the same
`Store.add_device` that `POST /admin/devices` uses); when provisioning grows one, only
`register` changes.

A simulated device's private key is derived from a per-run secret and its id, so a worker
process can rebuild it without ten thousand key files passing between processes. That is
fine for simulated bells only: a real device makes its key itself and never shares it.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.store import Device, SqliteDatabase
from protocol.clock import wall_ms
from protocol.keys import public_key_to_b64
from simulator.scenario import SimDevice


def new_run_secret() -> str:
    return secrets.token_hex(32)


def device_key(run_secret: str, device_id: str) -> Ed25519PrivateKey:
    seed = hashlib.sha256(f"{run_secret}:{device_id}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def register(database: Path, devices: Iterable[SimDevice], run_secret: str) -> int:
    """Put every device, with its public key, kind and district, into the gateway's store."""
    database.parent.mkdir(parents=True, exist_ok=True)
    store = SqliteDatabase(database)
    now_ms = wall_ms()
    count = 0
    try:
        for d in devices:
            public = public_key_to_b64(device_key(run_secret, d.id).public_key())
            store.add_device(Device(d.id, public, d.kind, d.district, "simulated"), now_ms=now_ms)
            count += 1
    finally:
        store.close()
    return count
