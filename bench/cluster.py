"""The city mode against the embedded default: press -> centre through real parts, and the
time a database failover costs.

One run on this machine (loopback; every server a process of its own):
- the cluster: three RabbitMQ nodes (Debian's rabbitmq-server, quorum queues, mTLS), a
  PostgreSQL primary with a streaming standby (fsync on), and 1, 2, then 3 gateway processes
  consuming the uplink queue and sharing one database (a fresh one per run);
- the embedded default: mosquitto (mTLS, MQTT 5 shared subscription) and one gateway
  process on its SQLite file;
- the same load on each: `--bells` real device agents in this process (signing, outbox,
  mTLS), each pressed `--presses` times at once; the reference centre receiver in this
  process. Each alert's latency is the centre's receipt time minus the bell's press time
  (`ts_ms`), both this machine's clock; alerts/s is the alerts over first press to last
  receipt.
- failover: one gateway on the cluster, a bell pressed every `--press-every-ms`; SIGKILL of
  the primary's postmaster, then `pg_ctl promote` of the standby at once (what
  pg_auto_failover does after its health checks; their ~50 s default is not in this
  figure); the time from the kill to the first alert pressed after it that reaches the
  centre (committed on the new primary: the outbox is there), and the time the promotion
  itself took.

Everything, the bells included, shares 2 cores here: the cluster's figures are a ratio
between its runs and against the default, not what separate machines would do.

Run: .venv/bin/python bench/cluster.py [--bells 100] [--presses 2]
(last line: one JSON object). Needs root (PostgreSQL's tools run as `postgres`),
rabbitmq-server, postgresql and mosquitto (scripts/system-deps.sh).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal

# Run as a script, this file's own directory leads sys.path; the tests' kits for RabbitMQ,
# PostgreSQL and the cluster's parts are shared with the bench rather than copied.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path += [str(_HERE.parent / "tests"), str(_HERE.parent / "tests" / "cluster")]

from ansimi_testkit import AlertsSent, centre, eventually, running  # noqa: E402
from cluster_kit import (  # noqa: E402
    Bell,
    Broker,
    BrokerAt,
    gateway_toml,
    make_bell,
    press,
)
from netns_kit import HostedGateway  # noqa: E402
from pg_testkit import PgServer, postgres_bin  # noqa: E402
from rabbit_kit import RabbitNode, rabbit_cluster  # noqa: E402

from ansimi.broker import BrokerTls, Mosquitto, MosquittoConfig, free_port  # noqa: E402
from console.receiver import Receiver  # noqa: E402
from gateway.store import open_store, sqlite_url  # noqa: E402
from protocol.clock import wall_ms  # noqa: E402
from protocol.jws import Signer  # noqa: E402
from protocol.keys import load_private_key  # noqa: E402
from provisioning.rabbitmq import sync  # noqa: E402
from siteca.site import Site, init_site  # noqa: E402

TIME_LIMIT_S = 120.0  # per run: a run that has not delivered by then is reported as such
READY_S = 90.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def centre_alerts(receiver: Receiver) -> list[tuple[int, int]]:
    """(press ms, receipt ms) of every alert the centre has."""
    found = (receiver.events.get(i) for i in receiver.events.ids())
    return [(e.ts_ms, e.received_ms) for e in found if e is not None and e.type == "alert"]


class Deployment:
    """One way to run the site: its brokers, its store, its gateways' kind."""

    def __init__(
        self,
        site: Site,
        brokers: Sequence[Broker],
        amqp: Sequence[RabbitNode],
        version: Literal[5, 311],
    ) -> None:
        self.site = site
        self.brokers = brokers
        self.amqp = amqp
        self.version = version

    @contextlib.asynccontextmanager
    async def up(
        self, tmp: Path, store: str, instances: int, bells: int
    ) -> AsyncIterator[tuple[list[Bell], Receiver, AlertsSent]]:
        """Bells registered in `store`, `instances` gateways, all ready, until the block ends;
        the alerts the bells send are in the AlertsSent."""
        tmp.mkdir(parents=True)
        sent = AlertsSent()
        signer = Signer(self.site.gateway_id, load_private_key(self.site.layout.gateway_key))
        made = [
            make_bell(
                self.site,
                f"bell-{n:04d}",
                self.brokers,
                signer,
                tmp,
                sent,
                self.version,
            )
            for n in range(bells)
        ]
        if self.amqp:  # the broker's users for the certificates just issued
            await asyncio.to_thread(sync, self.site, self.amqp[0].ctl())
        registry = open_store(store)
        try:
            for _bell, device in made:
                await registry.add_device(device, now_ms=0)
        finally:
            await registry.close()
        async with centre(tmp) as (receiver, url):
            gateways = []
            for n in range(instances):
                api_port = free_port()
                config = tmp / f"gw{n + 1}.toml"
                config.write_text(
                    gateway_toml(
                        self.site,
                        f"gw{n + 1}",
                        store=store,
                        centre_url=url,
                        api=("127.0.0.1", api_port),
                        brokers=self.brokers,
                        amqp=self.amqp,
                    )
                )
                gateways.append(HostedGateway(config, api_port))
            try:
                for gateway in gateways:
                    gateway.start()
                for gateway in gateways:
                    await gateway.ready(READY_S)
                agents = [bell.agent for bell, _ in made]
                async with running(*(a.run() for a in agents)):
                    for agent in agents:
                        await asyncio.wait_for(agent.ready.wait(), READY_S)
                    yield [bell for bell, _ in made], receiver, sent
            finally:
                for gateway in gateways:
                    gateway.kill()


async def burst(deployment: Deployment, tmp: Path, store: str, instances: int, args: Any) -> dict:
    """Every bell pressed `presses` times at once; figures once all are at the centre.

    A bell keeps one alert of an incident in flight: presses while it is out fold into the
    next report (device/behaviour.py), so the load is the number of bells, not of presses."""
    async with deployment.up(tmp, store, instances, args.bells) as (bells, receiver, sent):
        started_ms = wall_ms()
        for _ in range(args.presses):
            for bell in bells:
                press(bell)

        def delivered() -> bool:
            outboxes_empty = all(b.agent.outbox.depth() == 0 for b in bells)
            return outboxes_empty and len(centre_alerts(receiver)) == len(sent.ids)

        try:
            await eventually(delivered, TIME_LIMIT_S)
        except TimeoutError:
            count = len(centre_alerts(receiver))
            return {"alerts": len(sent.ids), "arrived": count, "timed_out": True}
        arrived = centre_alerts(receiver)
    latencies = [received - pressed for pressed, received in arrived]
    seconds = (max(received for _, received in arrived) - started_ms) / 1000
    return {
        "gateways": instances,
        "alerts": len(arrived),
        "alerts_per_s": round(len(arrived) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5)),
        "p99_ms": round(percentile(latencies, 0.99)),
    }


async def failover(
    deployment: Deployment, tmp: Path, primary: PgServer, standby: PgServer, args: Any
) -> dict:
    """SIGKILL of the primary under a steady trickle of presses, then promotion."""
    store = both_hosts(primary, standby, "failover")
    async with deployment.up(tmp, store, 1, args.bells) as (bells, receiver, _):
        stop = asyncio.Event()

        async def trickle() -> None:
            n = 0
            while not stop.is_set():
                press(bells[n % len(bells)])
                n += 1
                await asyncio.sleep(args.press_every_ms / 1000)

        async with running(trickle()):
            # steady: the trickle's alerts arrive before the kill
            await eventually(lambda: len(centre_alerts(receiver)) >= 10, READY_S)
            postmaster = int((primary.data / "postmaster.pid").read_text().split()[0])
            killed_ms = wall_ms()
            os.kill(postmaster, signal.SIGKILL)
            standby.promote()
            promoted_ms = wall_ms()

            def after_kill() -> list[int]:
                return [r for p, r in centre_alerts(receiver) if p > killed_ms]

            try:
                await eventually(lambda: bool(after_kill()), TIME_LIMIT_S)
            except TimeoutError:
                return {"timed_out": True}
            stop.set()
            return {
                "promote_ms": round(promoted_ms - killed_ms),
                "kill_to_first_alert_ms": round(min(after_kill()) - killed_ms),
            }


def both_hosts(primary: PgServer, standby: PgServer, database: str) -> str:
    """A new database on the pair, named by both hosts: writes go to whichever is primary."""
    primary.psql(f"CREATE DATABASE {database}")
    hosts = f"127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
    return f"postgresql://ansimi@{hosts}/{database}?target_session_attrs=read-write"


def show(name: str, figures: dict[str, Any]) -> None:
    if figures.get("timed_out"):
        print(f"{name:22} timed out after {TIME_LIMIT_S:g} s: {figures}")
    elif "alerts_per_s" in figures:
        print(
            f"{name:22} {figures['alerts_per_s']:>7} alerts/s,"
            f" press->centre p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms"
            f" ({figures['alerts']} alerts)"
        )
    else:
        print(
            f"{name:22} SIGKILL of the primary -> first alert committed on the standby and"
            f" at the centre: {figures['kill_to_first_alert_ms']} ms"
            f" (promotion took {figures['promote_ms']} ms of it)"
        )


async def run(args: Any, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "cluster", "machine": platform.machine()}
    result |= {"cpus": os.cpu_count(), "bells": args.bells, "presses": args.presses}
    init_site(tmp / "site", site="bench", listen_host="127.0.0.1", port=8883)
    site = Site.open(tmp / "site")

    broker_dir = tmp / "mosquitto"
    lay = site.layout.broker
    tls = BrokerTls(lay.ca_file, lay.cert_file, lay.key_file)
    with Mosquitto(MosquittoConfig(state_dir=broker_dir, tls=tls)) as mosquitto:
        embedded = Deployment(site, [BrokerAt(mosquitto.host, mosquitto.port)], [], 5)
        figures = await burst(embedded, tmp / "embedded", sqlite_url(tmp / "gw.db"), 1, args)
    show("embedded (1 gateway)", figures)
    result["embedded"] = figures

    bin = postgres_bin()
    if bin is None:
        raise SystemExit("PostgreSQL is not installed: scripts/system-deps.sh installs it")
    with rabbit_cluster(site, tmp / "rmq", 3) as nodes:
        cluster = Deployment(site, nodes, nodes, 311)
        primary = PgServer.create(bin, fsync=True)
        standby: PgServer | None = None
        try:
            primary.start()
            standby = primary.standby()
            for instances in (1, 2, 3):
                store = both_hosts(primary, standby, f"run{instances}")
                figures = await burst(cluster, tmp / f"c{instances}", store, instances, args)
                show(f"cluster ({instances} gateway{'s' if instances > 1 else ''})", figures)
                result[f"cluster_{instances}"] = figures
            figures = await failover(cluster, tmp / "failover", primary, standby, args)
            show("failover", figures)
            result["failover"] = figures
        finally:
            for server in (primary, standby):
                if server is not None:
                    server.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bells", type=int, default=100)
    parser.add_argument("--presses", type=int, default=2)
    parser.add_argument("--press-every-ms", type=int, default=50)
    args = parser.parse_args()
    # the bells' own warnings (no SMS numbers, a link lost in the failover) are not figures
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="ansimi-bench-cluster-") as folder:
        result = asyncio.run(run(args, Path(folder)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
