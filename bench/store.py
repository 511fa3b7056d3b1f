"""The intake's group commit on each store engine: `accept_batch` of 100 alerts, SQLite against
PostgreSQL, on this machine, in one run.

- SQLite: a file in a temporary folder, WAL, synchronous=FULL (the gateway's settings);
- PostgreSQL: a server this run starts (initdb, pg_ctl; as the `postgres` user when run as
  root) on a free loopback port, fsync on, reached over TCP through asyncpg as the gateway does.

Each engine: 100 registered bells; batches of 100 alerts (one per bell, as a busy intake
gathers them), then single-alert commits (an intake that is not busy). Figures: alerts/s over
the batches, p50/p99 of one batch's commit, p50/p99 of one single commit; and PostgreSQL's
ratio to SQLite. Everything shares 2 cores here: orders of magnitude, not a promise.

Run: .venv/bin/python bench/store.py [--batches 50] [--singles 300]
(last line: one JSON object). Skips PostgreSQL, saying so, where the server is not installed.
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
from typing import Any

# Run as a script, this file's own directory leads sys.path; the tests' PostgreSQL kit is
# shared with the bench rather than copied.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.append(str(_HERE.parent / "tests"))

from pg_testkit import PgServer, postgres_bin  # noqa: E402

from gateway.store import Device, Incoming, Store, open_store, sqlite_url  # noqa: E402

BATCH = 100
DEVICES = 100
TIME_LIMIT_S = 30.0  # per engine and phase: the run stays around a minute or two
JWS = "e" * 450  # about a real alert's compact JWS


def _alert(n: int) -> Incoming:
    device = f"bell-{n % DEVICES:04d}"
    return Incoming(
        f"alert-{n:08d}",
        device,
        n,
        "alert",
        1_000,
        '{"trigger":"press","silent":false}',
        JWS,
        ("central", "mapo"),
    )


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def measure(store: Store, batches: int, singles: int) -> dict[str, Any]:
    for d in range(DEVICES):
        await store.add_device(Device(f"bell-{d:04d}", "key", "bell", "mapo"), 0)
    await store.accept_batch([_alert(0)], 1)  # connections and statements warmed up
    n = 1
    batch_s: list[float] = []
    began = time.perf_counter()
    for _ in range(batches):
        batch = [_alert(n + i) for i in range(BATCH)]
        n += BATCH
        start = time.perf_counter()
        done = await store.accept_batch(batch, n)
        batch_s.append(time.perf_counter() - start)
        assert all(done.fresh), "every alert of a batch is new"
        if time.perf_counter() - began > TIME_LIMIT_S:
            break
    batched_elapsed = time.perf_counter() - began
    single_s: list[float] = []
    began = time.perf_counter()
    for _ in range(singles):
        start = time.perf_counter()
        await store.accept_batch([_alert(n)], n)
        single_s.append(time.perf_counter() - start)
        n += 1
        if time.perf_counter() - began > TIME_LIMIT_S:
            break
    return {
        "batches": len(batch_s),
        "alerts_per_s": round(len(batch_s) * BATCH / batched_elapsed),
        "batch_p50_ms": round(_percentile(batch_s, 0.5) * 1000, 2),
        "batch_p99_ms": round(_percentile(batch_s, 0.99) * 1000, 2),
        "singles": len(single_s),
        "single_p50_ms": round(_percentile(single_s, 0.5) * 1000, 2),
        "single_p99_ms": round(_percentile(single_s, 0.99) * 1000, 2),
    }


async def run_engine(url: str, batches: int, singles: int) -> dict[str, Any]:
    store = open_store(url)
    try:
        return await measure(store, batches, singles)
    finally:
        await store.close()


def _show(name: str, figures: dict[str, Any]) -> None:
    print(
        f"{name:10} {figures['alerts_per_s']:>7} alerts/s in batches of {BATCH}"
        f" (one batch p50 {figures['batch_p50_ms']} ms, p99 {figures['batch_p99_ms']} ms);"
        f" one alert a commit p50 {figures['single_p50_ms']} ms, p99 {figures['single_p99_ms']} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--singles", type=int, default=300)
    args = parser.parse_args()
    result: dict[str, Any] = {"bench": "store", "batch": BATCH, "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = asyncio.run(
            run_engine(sqlite_url(Path(folder) / "gateway.db"), args.batches, args.singles)
        )
    _show("sqlite", sqlite)
    result["sqlite"] = sqlite
    bin = postgres_bin()
    if bin is None:
        print("postgresql: skipped, no server installed (apt-get install -y postgresql)")
        result["postgresql"] = None
    else:
        server = PgServer.create(bin, fsync=True)
        try:
            server.start()
            pg = asyncio.run(run_engine(server.url(), args.batches, args.singles))
        finally:
            server.remove()
        _show("postgresql", pg)
        ratio = pg["alerts_per_s"] / sqlite["alerts_per_s"]
        single_ratio = pg["single_p50_ms"] / sqlite["single_p50_ms"]
        print(
            f"postgresql / sqlite: {ratio:.2f}x the batched alerts/s;"
            f" {single_ratio:.1f}x the single commit's p50"
        )
        result |= {"postgresql": pg, "ratio_batched": round(ratio, 3)}
        result["ratio_single_p50"] = round(single_ratio, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
