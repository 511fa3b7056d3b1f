"""The intake's CPU per heartbeat, in one process, against the verify it cannot skip.

`Intake.process` as the service wires it (supervisor, secondary-path watch, fleet health,
heartbeats flushed every second to a SQLite file with synchronous=FULL), one heartbeat a
call as they arrive at a city's rate, each device once (its first heartbeat since the
gateway started: headers not cached, its fleet-health row new) and then once more. CPU of
the whole process (the store's thread too) per heartbeat, and the ratio of one libsodium
verify to it. bench/gateway.py measures the same work end to end, with paho, the broker
and the load sharing the machine; this one leaves those out, so it moves less with the
neighbours and tells the intake's own share.

Run: .venv/bin/python bench/intake.py [--devices 10000]   (last line: one JSON object)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's own directory leads sys.path, and bench/gateway.py there
# would shadow the gateway package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from nacl.bindings import crypto_sign_open  # noqa: E402

from ansimi.mqtt import Message  # noqa: E402
from gateway.downlink import Downlink  # noqa: E402
from gateway.fleethealth import FleetHealth  # noqa: E402
from gateway.intake import Intake, Registry  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.secondary import SecondaryPathWatch  # noqa: E402
from gateway.service import settle_gc  # noqa: E402
from gateway.store import Device, SqliteStore  # noqa: E402
from gateway.supervise import Supervisor  # noqa: E402
from protocol.envelope import seal  # noqa: E402
from protocol.jws import Signer  # noqa: E402
from protocol.keys import public_key_to_b64  # noqa: E402
from protocol.messages import Heartbeat, SecondaryPath, build_message  # noqa: E402
from protocol.topics import up_topic  # noqa: E402

NOW_MS = 1_800_000_000_000
HEARTBEAT_S = 10  # a bell's interval: the second round is dated one interval later
CENTRES = ("central",)
BEAT = Heartbeat(
    uptime_s=3600,
    power="mains",
    link_quality=80,
    firmware="bench",
    secondary=SecondaryPath(modem=True, sim="ready", registered=True, signal=70, numbers=2),
)


def key_for(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(name.encode()).digest())


def verify_us(seconds: float = 0.3) -> float:
    """CPU microseconds of one verify with the call protocol/jws.py makes."""
    key = key_for("floor")
    signed = key.sign(bytes(300)) + bytes(300)
    public = key.public_key().public_bytes_raw()
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        for _ in range(100):
            crypto_sign_open(signed, public)
        n += 100
    return (time.process_time() - start) / n * 1e6


async def intake_us(
    n_devices: int, state: Path, *, once_started: Callable[[], None] = lambda: None
) -> list[float]:
    """CPU microseconds per heartbeat: each device's first, then its next. `once_started`
    is called where the gateway would be ready (main: `settle_gc`, as the gateway does)."""
    store = SqliteStore(state / "gateway.db")
    devices = [f"beat-{i:05d}" for i in range(n_devices)]
    signers = {d: Signer(d, key_for(d)) for d in devices}
    for d, signer in signers.items():
        public = public_key_to_b64(signer.public_key)
        store.database.add_device(Device(d, public, "bell", "mapo"), now_ms=0)
    clock = [NOW_MS]

    def clock_ms() -> int:
        return clock[0]

    def publish(topic: str, payload: bytes) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    registry = Registry(store)
    await registry.reload()
    metrics = Metrics()
    downlink = Downlink(Signer("gw-bench", key_for("gw-bench")), publish, clock_ms=clock_ms)
    intake = Intake(
        store,
        registry,
        downlink,
        metrics,
        route=lambda _district: CENTRES,
        window_ms=300_000,
        clock_ms=clock_ms,
        supervisor=Supervisor(
            store,
            downlink,
            metrics,
            route_of=lambda _d: CENTRES,
            timeout_ms=35_000,
            clock_ms=clock_ms,
        ),
        secondary=SecondaryPathWatch(
            store, downlink, metrics, route_of=lambda _d: CENTRES, clock_ms=clock_ms
        ),
        on_heartbeats=FleetHealth(
            metrics, district_of=lambda _d: "mapo", drift_flag_ms=60_000, clock_ms=clock_ms
        ).heartbeats,
        heartbeat_flush_ms=1_000,
    )
    once_started()
    rounds = []
    for seq in (1, 2):
        sent_ms = clock[0] + (seq - 1) * HEARTBEAT_S * 1000
        messages = [
            Message(
                up_topic(d, "heartbeat"),
                seal(build_message(BEAT, device=d, seq=seq, ts=sent_ms), signer).encode(),
                1,
                False,
            )
            for d, signer in signers.items()
        ]
        start = time.process_time()
        for message in messages:
            clock[0] += 1  # 1,000 a second: a flush every 1,000
            await intake.process([message])
        await intake.flush_heartbeats()
        rounds.append((time.process_time() - start) / n_devices * 1e6)
    await store.close()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    args = parser.parse_args()
    floor_before = verify_us()
    with tempfile.TemporaryDirectory(prefix="ansimi-bench-") as tmp:
        first, after = asyncio.run(intake_us(args.devices, Path(tmp), once_started=settle_gc))
    floor = (floor_before + verify_us()) / 2
    print(f"verify (libsodium, one core): {floor:.1f} us")
    print(
        f"Intake.process, {args.devices:,} devices, one heartbeat a call: a device's first "
        f"{first:.1f} us, its next {after:.1f} us of CPU; "
        f"verify / CPU {floor / first:.2f} and {floor / after:.2f}"
    )
    figures = {
        "devices": args.devices,
        "verify_us": round(floor, 1),
        "first_heartbeat_us": round(first, 1),
        "next_heartbeat_us": round(after, 1),
        "first_heartbeat_ratio": round(floor / first, 3),
        "next_heartbeat_ratio": round(floor / after, 3),
    }
    print(json.dumps({"bench": "intake", "figures": figures}))


if __name__ == "__main__":
    main()
