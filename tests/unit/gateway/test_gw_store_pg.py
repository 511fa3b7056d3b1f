"""What the PostgreSQL store does beyond the contract: instances sharing one outbox, losing
the server and a primary, migrations, and where its password comes from. Against a real
PostgreSQL (tests/pg_testkit.py); the shared contract is test_gw_store_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from gw_testkit import CENTRAL_TOML, NOW, Clock
from pg_testkit import PgServer, new_postgres

from ansimi.config import ConfigError, load_config
from gateway.config import Centre, ForwardConfig, GatewayConfig
from gateway.enrolments import TokenRefused
from gateway.forward import Forwarder
from gateway.metrics import Metrics
from gateway.store import (
    OPEN_OUTAGE_PER_DISTRICT,
    BadStoreUrl,
    Delivery,
    Device,
    DeviceUpdate,
    Incoming,
    RolloutRecord,
    StoreConflict,
    StoreError,
    StoreFull,
    StoreUnavailable,
    StoreVersionError,
    open_store,
)
from gateway.store_pg import (
    CLAIM_MS,
    PG_MIGRATIONS,
    PG_SCHEMA_VERSION,
    PostgresStore,
    pg_error,
    read_password,
)
from gateway.transports import DELIVERED, Outcome


def alert(n: int, device_id: str = "bell-0001") -> Incoming:
    return Incoming(f"alert-{n:04d}", device_id, n, "alert", 1_000, "{}", f"jws-{n}", ("central",))


async def opened(url: str, **options: object) -> PostgresStore:
    store = PostgresStore(url, **options)  # type: ignore[arg-type]
    await store.add_device(Device("bell-0001", "key", "bell", "mapo"), 0)
    return store


@pytest.fixture
async def two_instances(postgres: PgServer) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two gateway instances' stores on one database, as on two hosts."""
    url = postgres.new_database()
    first = await opened(url)
    second = PostgresStore(url)
    yield first, second
    await first.close()
    await second.close()


async def test_two_instances_claim_disjoint_deliveries(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = two_instances
    await first.accept_batch([alert(n) for n in range(1, 41)], 100)
    # both ask at once, in rounds, as two forwarders would
    taken: list[set[str]] = [set(), set()]
    for _ in range(3):
        got = await asyncio.gather(
            first.due_for("central", 100, 8), second.due_for("central", 100, 8)
        )
        for mine, deliveries in zip(taken, got, strict=True):
            mine.update(d.event_id for d in deliveries)
    assert taken[0] and taken[1]
    assert not taken[0] & taken[1]
    assert len(taken[0] | taken[1]) == len(taken[0]) + len(taken[1])
    # an instance asking again gets its own claims back, never the other's
    again = {d.event_id for d in await first.due_for("central", 100, 40)}
    assert taken[0] <= again and not again & taken[1]


def pressed(n: int, device_id: str = "bell-0001") -> Incoming:
    body = '{"bell":"emergency","trigger":"press"}'
    return Incoming(f"alert-{n:04d}", device_id, n, "alert", 1_000, body, f"jws-{n}", ("central",))


async def test_configured_priorities_reach_the_postgresql_store(postgres: PgServer) -> None:
    store = open_store(postgres.new_database(), {"stalking": 2})
    try:
        await store.add_device(Device("bell-0001", "key", "bell", "mapo"), 0)
        await store.accept_batch([pressed(1)], 100)
        (incident,) = await store.incidents("open", 10)
        assert (incident.kind, incident.priority) == ("stalking", 2)
    finally:
        await store.close()


async def test_two_instances_open_one_incident_per_bell_and_take_each_step_once(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    """Alerts of one bell kept by two instances at once join one incident; both escalating
    it at once, exactly one takes the step (the conditional update, not a read then a write)."""
    stores = two_instances
    for round_ in range(5):  # bounded: a few rounds to give the race its chances
        n = 2 * round_ + 1
        await asyncio.gather(
            stores[0].accept_batch([pressed(n)], 100), stores[1].accept_batch([pressed(n + 1)], 100)
        )
        (incident,) = await stores[0].incidents("open", 10)
        attached = {await stores[1].incident_of(f"alert-{i:04d}") for i in (n, n + 1)}
        assert attached == {incident.incident_id}
        steps = [(f"esc-{n}-{i}", 1, 150, '{"level":1}', "jws-of-esc") for i in (0, 1)]
        taken = await asyncio.gather(
            *(
                store.escalate(incident.incident_id, 1, "police", step, 160)
                for store, step in zip(stores, steps, strict=True)
            )
        )
        assert sorted(taken) == [False, True]
        await stores[0].move_incident(incident.incident_id, "closed", 200, "desk", "test")
    assert len(await stores[0].due_for("police", 300, 100)) == 5


async def test_two_instances_start_one_rollout_offer_each_device_once_and_settle_it(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    """Two gateway instances' rollout loops and intakes at once on one rollout: one start
    wins, each device is claimed for its offer by one of them, and the last two reports,
    kept by different instances at the same moment, still find the rollout done (each change
    holds the rollout's row, so the second sees the first's report)."""
    stores = two_instances
    bells = [f"bell-{n:04d}" for n in range(1, 21)]
    for device_id in bells[1:]:
        await stores[0].add_device(Device(device_id, "key", "bell", "mapo"), 0)
    for round_ in range(5):  # bounded: a few rounds to give the race its chances
        devices = [DeviceUpdate(d) for d in bells]
        records = [
            RolloutRecord(f"r-{round_}-{i}", "2.0", "mapo", 100.0, "running", 10) for i in (0, 1)
        ]
        started = await asyncio.gather(
            *(s.start_rollout(r, devices) for s, r in zip(stores, records, strict=True))
        )
        assert sorted(started) == [False, True]
        (current, *_) = await stores[1].rollouts(1)
        offered = await asyncio.gather(
            *(s.offer_rollout(current.rollout_id, 100, 1_000) for s in stores)
        )
        assert not set(offered[0]) & set(offered[1])
        assert sorted(offered[0] + offered[1]) == bells
        for device_id in bells[2:]:
            await stores[0].report_update(current.rollout_id, device_id, "installed", None, 200)
        await asyncio.gather(
            *(
                s.report_update(current.rollout_id, d, "installed", None, 300)
                for s, d in zip(stores, bells[:2], strict=True)
            )
        )
        (current, *_) = await stores[0].rollouts(1)
        assert current.state == "done"


@dataclass
class CountingCentre:
    """A centre that takes everything, after a yield so two forwarders' sends interleave."""

    concurrency: int = 4
    seen: list[str] = field(default_factory=list)

    async def send(self, delivery: Delivery, district: str) -> Outcome:
        await asyncio.sleep(0)
        self.seen.append(delivery.event_id)
        return DELIVERED

    async def aclose(self) -> None:
        pass


async def test_two_gateways_forward_one_outbox_each_alert_once(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    """The forwarders of two gateway instances on one database: the centre hears each alert
    from one of them, and both take a share."""
    stores = two_instances
    await stores[0].accept_batch([alert(n) for n in range(1, 61)], NOW)
    centre = CountingCentre()
    forwarders = [
        Forwarder(
            store,
            [Centre(name="central", url="https://127.0.0.1/events", secret="s" * 24)],
            ForwardConfig(),
            Metrics(),
            district_of=lambda _device: "mapo",
            on_first_delivery=lambda _delivery: None,
            clock_ms=Clock(),
            rng=random.Random(seed),
            transports={"central": centre},  # type: ignore[dict-item]
        )
        for seed, store in enumerate(stores)
    ]
    sent = [0, 0]
    for _ in range(30):  # bounded: 60 deliveries, at most 4 in flight per forwarder
        counts = await asyncio.gather(*(f.pump() for f in forwarders))
        sent = [a + b for a, b in zip(sent, counts, strict=True)]
        if await stores[0].waiting_count() == 0:
            break
    assert await stores[0].waiting_count() == 0
    assert sorted(centre.seen) == [f"alert-{n:04d}" for n in range(1, 61)]  # each once
    assert all(sent), sent


async def test_a_claim_ends_with_the_outcome_or_lapses(
    two_instances: tuple[PostgresStore, PostgresStore],
) -> None:
    first, second = two_instances
    await first.accept_batch([alert(1), alert(2)], 100)
    assert len(await first.due_for("central", 100, 10)) == 2
    assert await second.due_for("central", 100, 10) == []
    # a failed attempt frees the row for whichever instance comes at the next attempt
    await first.failed("alert-0001", "central", 500, "HTTP 503")
    assert [d.event_id for d in await second.due_for("central", 500, 10)] == ["alert-0001"]
    # the first instance dies holding alert-0002: after the claim lapses the second sends it
    lapses_ms = 100 + CLAIM_MS
    assert all(
        d.event_id != "alert-0002" for d in await second.due_for("central", lapses_ms - 1, 10)
    )
    lapsed = await second.due_for("central", lapses_ms, 10)
    assert "alert-0002" in {d.event_id for d in lapsed}


async def test_an_instance_cut_off_mid_transaction_stops_holding_the_alert_it_was_keeping(
    postgres: PgServer,
) -> None:
    """The host of one instance loses its network after the intake inserted an alert's id
    and before COMMIT: the server sees an idle transaction holding that id's lock. The
    bell resends to another instance, whose insert of the same id waits on that lock; the
    server ends the open transaction after the cut-off instance's idle limit, so the wait
    is bounded (the multi-host test's cable pull met this: the intake of gw1 stuck)."""
    url = postgres.new_database()
    cut_off = await opened(url, idle_in_transaction_s=0.5)
    other = PostgresStore(url)
    # the cut-off instance's own pooled connection (its session settings), never released:
    # a vanished client neither commits nor rolls back
    connection = await (await cut_off._ready()).acquire()
    try:
        await connection.execute("BEGIN")
        await connection.execute(
            "INSERT INTO event_ids (event_id, device_id) VALUES ($1, $2)",
            "alert-0001",
            "bell-0001",
        )
        async with asyncio.timeout(10):  # far below the 30 s command timeout
            accepted = await other.accept_batch([alert(1)], 100)
        assert accepted.fresh == [True]
    finally:
        with contextlib.suppress(asyncpg.InterfaceError):  # the server may have ended it
            connection.terminate()
        await other.close()
        await cut_off.close()


async def test_migrations_are_recorded_and_a_newer_schema_is_refused(postgres: PgServer) -> None:
    url = postgres.new_database()
    store = await opened(url)
    assert await store.schema_version() == PG_SCHEMA_VERSION
    await store.close()
    again = PostgresStore(url)
    assert await again.device("bell-0001") is not None  # migrated once, data kept
    await again.close()
    database = url.rsplit("/", 1)[1]
    postgres.psql(f"UPDATE schema_version SET version = {PG_SCHEMA_VERSION + 1}", database)
    newer = PostgresStore(url)
    with pytest.raises(StoreVersionError, match="newer gateway"):
        await newer.devices()
    await newer.close()


async def test_layers_sealed_before_version_8_are_taken_as_sealed_to_the_device_s_key(
    postgres: PgServer,
) -> None:
    url = postgres.new_database()
    store = await opened(url)
    await store.close()
    database = url.rsplit("/", 1)[1]
    # as a gateway of version 7 left it
    postgres.psql(
        "ALTER TABLE config_layers DROP COLUMN sealed_to_key;"
        " UPDATE schema_version SET version = 7;"
        " INSERT INTO config_layers VALUES"
        " ('device', 'bell-0001', '{\"sms\": {\"numbers_from_gateway\": \"x\"}}', 0),"
        " ('device', 'bell-0002', '{}', 0)",
        database,
    )
    upgraded = PostgresStore(url)
    layers = {(x.scope, x.name): x.sealed_to_key for x in await upgraded.config_layers()}
    assert layers == {("device", "bell-0001"): "key", ("device", "bell-0002"): None}
    assert await upgraded.schema_version() == PG_SCHEMA_VERSION
    await upgraded.close()


async def test_two_open_outages_of_a_district_from_before_the_index_migrate_to_one(
    postgres: PgServer,
) -> None:
    """Before the outage's district was kept, two instances could open two outages for one
    district. The migration keeps the oldest open one as the district's (its statuses join
    it) and leaves the other open for an operator to close; the unique index is made."""
    url = postgres.new_database()
    step = next(v for v, _, sql in PG_MIGRATIONS if OPEN_OUTAGE_PER_DISTRICT in sql)
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            await connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for version, _what, sql in PG_MIGRATIONS:
                if version < step:
                    await connection.execute(sql)
            await connection.execute("INSERT INTO schema_version VALUES ($1)", step - 1)
            await connection.executemany(
                "INSERT INTO devices (device_id, public_key, kind, district, created_ms)"
                " VALUES ($1, 'key', 'bell', 'mapo', 0)",
                [("bell-0001",), ("bell-0004",)],
            )
            await connection.executemany(
                "INSERT INTO incidents (incident_id, device_id, kind, priority, opened_ms,"
                " updated_ms, offline) VALUES ($1, $2, 'district_outage', 8, $3, $3, TRUE)",
                [("outage-b", "bell-0004", 105), ("outage-a", "bell-0001", 100)],
            )
    finally:
        await connection.close()
    store = PostgresStore(url)
    try:
        assert await store.schema_version() == PG_SCHEMA_VERSION
        body = '{"state":"district_restored","district":"mapo","count":0,"offline":[]}'
        restored = Incoming("restored-1", "bell-0004", 2, "status", 1_000, body, "jws", ())
        await store.add_event(restored, 200)
        assert await store.incident_of("restored-1") == "outage-a"
        by_id = {i.incident_id: i for i in await store.incidents("open", 10)}
        assert sorted(by_id) == ["outage-a", "outage-b"]
        assert not by_id["outage-a"].offline and by_id["outage-b"].offline
    finally:
        await store.close()


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A server of this test's own, to stop and start without disturbing the others."""
    server = new_postgres()
    try:
        yield server
    finally:
        server.remove()


async def test_the_store_recovers_by_itself_when_the_server_comes_back(
    own_server: PgServer,
) -> None:
    clock = [1_000.0]
    store = await opened(own_server.url(), reconnect_budget_s=0.3, clock=lambda: clock[0])
    await store.accept_batch([alert(1)], 100)
    own_server.stop()
    # the pooled connection is found lost (in use or when taken), then the reconnect budget
    # is spent: the store is down. Until its backoff has passed, a call then fails at once
    # instead of waiting the budget again (the intake's one-by-one fallback would wait it
    # per message)
    errors: list[StoreUnavailable] = []
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as lost:
            await store.accept_batch([alert(2)], 200)
        errors.append(lost.value)
        if "not tried again" in str(lost.value):
            break
    assert "not tried again" in str(errors[-1]) and len(errors) > 1
    assert all(isinstance(e, ConnectionError) for e in errors)  # what the intake catches
    own_server.start()
    clock[0] += 5.0
    # no reopen, no reset: the first call after the backoff reconnects
    done = await store.accept_batch([alert(2)], 300)
    assert done.fresh == [True]
    assert {e.event_id for e in await store.events(None, 10)} == {"alert-0001", "alert-0002"}
    await store.close()


async def test_a_failover_to_the_standby_is_followed_by_itself(own_server: PgServer) -> None:
    """Primary and streaming standby; the primary is killed and the standby promoted: the
    store, given both hosts, writes on the new primary with no help."""
    standby = own_server.standby()
    try:
        url = (
            f"postgresql://ansimi@127.0.0.1:{own_server.port},127.0.0.1:{standby.port}/postgres"
            "?target_session_attrs=read-write"
        )
        store = await opened(url, reconnect_budget_s=3.0)
        await store.accept_batch([alert(1)], 100)
        standby.wait_for_replay()
        own_server.stop("immediate")  # as a crash: no shutdown checkpoint handed over
        standby.promote()
        done = await _retried(lambda: store.accept_batch([alert(2)], 200))
        assert done.fresh == [True]
        assert {e.event_id for e in await store.events(None, 10)} == {"alert-0001", "alert-0002"}
        await store.close()
    finally:
        standby.remove()


async def _retried(call: object, attempts: int = 5) -> object:
    """As the intake does: a batch that met StoreUnavailable is handed in again."""
    for _ in range(attempts - 1):
        try:
            return await call()  # type: ignore[operator]
        except StoreUnavailable:
            continue
    return await call()  # type: ignore[operator]


# ---- the URL and the password ---------------------------------------------------------------


def test_a_password_in_the_url_is_refused_naming_the_key_and_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('store = "postgresql://ansimi:hunter2@db1:5432/ansimi"\n' + CENTRAL_TOML)
    with pytest.raises(ConfigError) as refused:
        load_config(config, GatewayConfig)
    text = str(refused.value)
    assert str(config) in text and "`store`" in text and "store_password_file" in text
    assert "hunter2" not in text  # the refusal must not spread the secret to the logs
    with pytest.raises(BadStoreUrl, match="holds a password") as in_query:
        open_store("postgresql://ansimi@db1/ansimi?password=hunter2")
    assert "hunter2" not in str(in_query.value)
    for bad, why in (("postgresql:///ansimi", "no host"), ("postgresql://db1:5432", "no database")):
        with pytest.raises(BadStoreUrl, match=why):
            open_store(bad)
    good = tmp_path / "good.toml"
    good.write_text(
        'store = "postgresql://ansimi@db1:5432,db2:5432/ansimi?target_session_attrs=read-write"'
        f'\nstore_password_file = "{tmp_path}/pw"\n' + CENTRAL_TOML
    )
    assert load_config(good, GatewayConfig).store_password_file == tmp_path / "pw"


def test_the_password_comes_from_the_credential_before_the_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "store-password").write_text("from-systemd\n")
    assert read_password(tmp_path / "pw", {}) == "from-file"
    assert read_password(tmp_path / "pw", {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}) == (
        "from-systemd"
    )
    assert read_password(None, {}) is None
    with pytest.raises(Exception, match="store_password_file"):
        read_password(tmp_path / "missing", {})


# ---- errors ---------------------------------------------------------------------------------


def test_driver_errors_become_the_store_errors_callers_handle() -> None:
    assert isinstance(pg_error(asyncpg.DiskFullError("no space"), "db"), StoreFull)
    # another instance's transaction, not the store: the same work again succeeds
    assert isinstance(pg_error(asyncpg.DeadlockDetectedError("deadlock"), "db"), StoreConflict)
    for lost in (
        ConnectionRefusedError(111, "refused"),
        asyncpg.ConnectionDoesNotExistError("closed in the middle"),
        asyncpg.AdminShutdownError("terminating connection"),
        asyncpg.ReadOnlySQLTransactionError("read-only transaction"),  # demoted primary
    ):
        assert isinstance(pg_error(lost, "db"), StoreUnavailable), lost
    other = pg_error(asyncpg.UndefinedTableError("no such table"), "db")
    assert type(other) is StoreError and "db" in str(other)
    # a decision, not a failure: it goes through as it is
    assert pg_error(TokenRefused("used"), "db") is None
