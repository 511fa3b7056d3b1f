"""How long a staged rollout takes: `--devices` bells of one district updated in `--step` %
steps, each step widened as soon as the one before is done.

Real parts in one process: a mosquitto of our own, the gateway (intake, the API serving
the bundle with Range, rollouts), and the bells (the real agent and its `Updater` on fake
hardware, simulator/updates.py), each restarted by a stand-in for systemd and the
launcher. Installing unpacks the release's pure wheels (no pip start-up); download,
signature and hash checks, the switch, the restart and the health check (connected,
self-test, an acknowledged report) are the real ones. One process holds every bell, so
the figures are an upper bound for the gateway's side: on a fleet each bell is its own Pi.

Per step: devices in it, seconds from the offer (start or widen) to the step's last
`update_installed`, and the process's CPU seconds. Bounded by `--limit` seconds in all.

Run: .venv/bin/python bench/rollout.py [--devices 1000] [--step 10]   (last line: JSON)
(`make bench` runs it at its defaults: 1,000 bells in 10 % steps.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's folder leads sys.path, and bench/protocol.py would shadow
# the `protocol` package; the repository root goes there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from ansimi.broker import Mosquitto, MosquittoConfig, free_port  # noqa: E402
from gateway.config import (  # noqa: E402
    ApiConfig,
    ApiToken,
    Centre,
    GatewayConfig,
    MqttConfig,
    UpdatesConfig,
)
from gateway.service import Gateway  # noqa: E402
from gateway.store import Device  # noqa: E402
from protocol.jws import Signer  # noqa: E402
from protocol.keys import generate_key, public_key_to_b64  # noqa: E402
from simulator.limits import raise_open_files  # noqa: E402
from simulator.updates import UpdatingBell, probe_bundle, under_systemd  # noqa: E402

POLL_S = 0.5


async def until(check: Callable[[], bool]) -> None:
    """Poll observable state (the bells', the rollout's); `--limit` bounds the whole run."""
    while not check():  # noqa: ASYNC110 - the states change in many places, no one event
        await asyncio.sleep(POLL_S)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    raise_open_files()
    work = Path(tempfile.mkdtemp(prefix="ansimi-rollout-"))
    broker = Mosquitto(MosquittoConfig(state_dir=work / "broker"))
    broker.start()
    try:
        return await _run(args, work, broker)
    finally:
        broker.stop()


async def _run(args: argparse.Namespace, work: Path, broker: Mosquitto) -> dict[str, Any]:
    release = Signer("release", generate_key())
    bundle = probe_bundle(work / "release", release, "2.0", min_version="1.0")
    port = free_port()
    gateway_signer = Signer("gw-bench", generate_key())
    # nobody listens at the centre: forwarding is not what is measured
    nowhere = Centre(name="central", url=f"http://127.0.0.1:{free_port()}/events", secret="x" * 16)
    config = GatewayConfig(
        id="gw-bench",
        database=work / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=broker.host, port=broker.port),
        centres=[nowhere],
        api=ApiConfig(
            enabled=True, port=port, tokens=[ApiToken(name="bench", role="admin", token="t" * 24)]
        ),
        updates=UpdatesConfig(
            release_public_key=public_key_to_b64(release.public_key),
            dir=work / "gateway" / "releases",
            public_url=f"http://127.0.0.1:{port}",
            # an offer lost on a busy machine (a bell reconnecting) is made again soon
            reoffer_s=args.reoffer,
        ),
    )
    gateway = Gateway(config, signer=gateway_signer)
    rollouts = gateway.rollouts
    assert rollouts is not None
    rollouts.releases.add(bundle)
    bells = []
    for n in range(args.devices):
        device_id = f"bell-{n:05d}"
        bell = UpdatingBell.at(work / device_id, Signer(device_id, generate_key()), "1.0")
        public = public_key_to_b64(bell.signer.public_key)
        await gateway.store.add_device(Device(device_id, public, "bell", "mapo"), now_ms=0)
        bells.append(bell)
    await gateway.registry.reload()
    tasks = [asyncio.create_task(gateway.run(), name="gateway")]
    tasks += [
        asyncio.create_task(
            under_systemd(
                b,
                broker=(broker.host, broker.port),
                gateway=gateway_signer,
                release_key=release.public_key,
                trial_s=args.trial,
                heartbeat_s=args.heartbeat,
            )
        )
        for b in bells
    ]
    steps: list[dict[str, Any]] = []
    started = time.monotonic()
    connected_s = None
    timed_out = False
    percent = 0.0
    cpu, at = cpu_s(), time.monotonic()
    try:
        async with asyncio.timeout(args.limit):
            await until(lambda: all(b.agent is not None and b.agent.ready.is_set() for b in bells))
            connected_s = time.monotonic() - started
            while percent < 100:
                percent = min(100.0, percent + args.step)
                cpu, at = cpu_s(), time.monotonic()
                if await rollouts.current() is None:
                    await rollouts.start("2.0", "mapo", percent)
                else:
                    await rollouts.resume(percent)
                current = await rollouts.current()
                while current is not None and current.state == "running":
                    await asyncio.sleep(POLL_S)  # its state lives in the store: read it again
                    current = await rollouts.current()
                assert current is not None
                steps.append(_step(current, percent, time.monotonic() - at, cpu_s() - cpu))
                print(json.dumps(steps[-1]), flush=True)
                if current.state != "done":
                    break
    except TimeoutError:
        timed_out = True  # said in the result, with the step it stopped in
        unfinished = not steps or steps[-1]["percent"] < percent
        current = await rollouts.current()
        if current is not None and percent and unfinished:
            steps.append(_step(current, percent, time.monotonic() - at, cpu_s() - cpu))
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    total = sum(s["seconds"] for s in steps)
    return {
        "bench": "rollout",
        "devices": args.devices,
        "step_percent": args.step,
        "connect_s": None if connected_s is None else round(connected_s, 1),
        "timed_out": timed_out,
        "rollout_s": round(total, 1),
        "steps": len(steps),
        "all_updated": bool(steps) and steps[-1]["state"] == "done" and steps[-1]["percent"] == 100,
        "per_step": steps,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _step(rollout: Any, percent: float, seconds: float, cpu: float) -> dict[str, Any]:
    return {
        "percent": percent,
        "devices": len(rollout.devices),
        "seconds": round(seconds, 2),
        "cpu_s": round(cpu, 2),
        "state": rollout.state,
        "counts": rollout.counts(),
        # more than one per device: offers lost (a bell reconnecting) and made again
        "offers": sum(p.offers for p in rollout.devices.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the figure (#18): time to update 1,000 devices at 10 % steps
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--step", type=float, default=10.0, help="percent per step")
    parser.add_argument("--heartbeat", type=float, default=10.0, help="bells' heartbeat_s")
    parser.add_argument("--trial", type=float, default=120.0, help="bells' trial_s")
    parser.add_argument("--limit", type=float, default=900.0, help="seconds in all, at most")
    parser.add_argument("--reoffer", type=float, default=30.0, help="gateway's reoffer_s")
    args = parser.parse_args()
    # a thousand agents tell each start and stop: only errors here
    logging.basicConfig(level=logging.ERROR)
    if not 0 < args.step <= 100 or args.devices < 1:
        parser.error("--step in (0, 100], --devices at least 1")
    steps = math.ceil(100 / args.step)
    print(f"rollout bench: {args.devices} bells, {steps} steps of {args.step:g}%", flush=True)
    print(json.dumps(asyncio.run(bench(args))))


if __name__ == "__main__":
    main()
