"""The gateway's CPU for a fleet's weekly test presses (issue #18: "should be noise").

In one process, the gateway's own parts on a real SQLite file (WAL, synchronous=FULL):
the intake (verify, replay checks, keep, the signed `received` ack, sealed but published
nowhere), the test watch following each test (gateway/testwatch.py) and the first centre's
`delivered` (the store's stage and the watch's pass). `--tests` pre-signed test presses from
`--devices` registered bells go through in intake batches; CPU is this process's
(time.process_time), signing excluded. Then the watch's own periodic look over the whole
fleet for bells whose scheduled test never came (every TICK_S), timed alone.

The figure: the share of one core that `--devices` bells testing once a week cost, as
(CPU per test x devices / week) + (CPU per look / TICK_S). Bounded by `--tests`; well under
a minute at the defaults.

Run: .venv/bin/python bench/fleet_tests.py [--devices 10000] [--tests 5000]
(last line: one JSON object)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder leads sys.path, and bench/protocol.py would shadow
# the `protocol` package; the repository root goes there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from ansimi.mqtt import Message as MqttMessage  # noqa: E402
from gateway.downlink import Downlink  # noqa: E402
from gateway.intake import Intake, Registry  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.store import Device, SqliteStore  # noqa: E402
from gateway.testwatch import TICK_S, TestWatch  # noqa: E402
from protocol.clock import wall_ms  # noqa: E402
from protocol.envelope import seal  # noqa: E402
from protocol.jws import Signer  # noqa: E402
from protocol.keys import generate_key, public_key_to_b64  # noqa: E402
from protocol.messages import Alert, build_message  # noqa: E402
from protocol.topics import up_topic  # noqa: E402

WEEK_S = 7 * 86_400
BATCH = 100  # the intake's batches, as under a steady trickle they are smaller still


async def bench(devices: int, tests: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ansimi-fleet-tests-") as tmp:
        store = SqliteStore(Path(tmp) / "gateway.db")
        signers = [Signer(f"bell-{n:05d}", generate_key()) for n in range(devices)]
        for signer in signers:
            key = public_key_to_b64(signer.public_key)
            store.database.add_device(Device(signer.kid, key, "bell", "mapo"), now_ms=0)
        registry = Registry(store)
        await registry.reload()
        metrics = Metrics()
        loop = asyncio.get_running_loop()

        def publish(_topic: str, _payload: bytes) -> asyncio.Future[None]:
            done: asyncio.Future[None] = loop.create_future()
            done.set_result(None)
            return done

        downlink = Downlink(Signer("gw-bench", generate_key()), publish)
        watch = TestWatch(
            store,
            downlink,
            metrics,
            route_of=lambda _d: ("central",),
            complete_within_ms=600_000,
            period_ms=7 * 86_400_000,
            devices=registry.device_ids,
        )
        intake = Intake(
            store,
            registry,
            downlink,
            metrics,
            route=lambda _district: ("central",),
            window_ms=10**12,  # pre-signed a while before they go through
            on_kept=watch.kept,
        )
        now = wall_ms()
        test = Alert(bell="emergency", trigger="test")
        messages = []
        for n in range(tests):
            signer = signers[n % devices]
            message = build_message(test, device=signer.kid, seq=n + 1, ts=now)
            token = seal(message, signer).encode()
            messages.append((message.id, MqttMessage(up_topic(signer.kid, "alert"), token, 1)))
        started = time.process_time()
        for at in range(0, tests, BATCH):
            batch = messages[at : at + BATCH]
            await intake.process([m for _, m in batch])
            ids = [(event_id, "central") for event_id, _ in batch]
            delivered = await store.delivered_many(ids, now)
            for (event_id, _), first in zip(batch, delivered, strict=True):
                if first:
                    watch.delivered(event_id)
        per_test_s = (time.process_time() - started) / tests
        looks = 20
        started = time.process_time()
        for _ in range(looks):
            await watch.tick()
        per_look_s = (time.process_time() - started) / looks
        passed = metrics.registry.get_sample_value(
            "ansimi_test_presses_total", {"outcome": "passed"}
        )
        await store.close()
    share = per_test_s * devices / WEEK_S + per_look_s / TICK_S
    return {
        "bench": "fleet_tests",
        "python": platform.python_version(),
        "devices": devices,
        "tests": tests,
        "passed": passed,
        "cpu_per_test_ms": round(per_test_s * 1000, 3),
        "cpu_per_look_ms": round(per_look_s * 1000, 3),
        "look_every_s": TICK_S,
        "weekly_tests_core_share": round(share, 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--tests", type=int, default=5_000)
    args = parser.parse_args()
    result = asyncio.run(bench(args.devices, min(args.tests, 50_000)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
