"""Retention (purge of closed events) and decommissioning at the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from gw_testkit import ADMIN, ALERT, CENTRAL_TOML, PRIVACY_TOKENS, Env, make_env

from ansimi.privacy import create_key_file
from gateway import store as store_module
from gateway.api import Api
from gateway.cli import gateway
from gateway.config import PrivacyConfig
from gateway.private import PrivateData, PrivateRoutes, open_vault
from gateway.store import Incoming, SqliteDatabase
from protocol.clock import wall_ms

DAY_MS = 86_400_000


async def alerts(env: Env, *ids: str) -> None:
    await env.feed(*(env.message(ALERT, "bell-0001", id=i) for i in ids))


async def test_only_closed_events_older_than_the_cutoff_go_and_dry_run_deletes_nothing() -> None:
    env = await make_env()
    await alerts(env, "old-closed-01", "old-open-0001", "new-closed-01")
    now = env.clock()
    await env.store.set_stage("old-closed-01", "closed", now - 40 * DAY_MS, "central")
    await env.store.set_stage("old-open-0001", "dispatched", now - 400 * DAY_MS, "central")
    await env.store.set_stage("new-closed-01", "closed", now - 1 * DAY_MS, "central")
    cutoff = now - 30 * DAY_MS
    assert env.store.database.purge_closed(cutoff, dry_run=True) == 1
    assert env.event_count() == 3
    assert env.store.database.purge_closed(cutoff, dry_run=False) == 1
    left = {e.event_id for e in env.store.database.events(None, 100)}
    assert left == {"old-open-0001", "new-closed-01"}
    assert env.store.database.stages("old-closed-01") == []
    # an alert never closed stays, however old
    assert env.store.database.purge_closed(now + 1000 * DAY_MS, dry_run=False) == 1
    assert {e.event_id for e in env.store.database.events(None, 100)} == {"old-open-0001"}


async def test_a_long_purge_goes_in_short_transactions(monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_env()
    ids = [f"closed-{n:06d}" for n in range(7)]
    await alerts(env, *ids, "still-open-01")
    now = env.clock()
    for event_id in ids:
        await env.store.set_stage(event_id, "closed", now - 40 * DAY_MS, "central")
    monkeypatch.setattr(store_module, "PURGE_BATCH", 3)
    transactions = 0
    begin = store_module.transaction

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal transactions
        transactions += 1
        return begin(*args, **kwargs)

    monkeypatch.setattr(store_module, "transaction", counted)
    assert env.store.database.purge_closed(now, dry_run=False) == 7
    assert transactions == 3  # 3 + 3 + 1: the lock is let go between them
    assert {e.event_id for e in env.store.database.events(None, 100)} == {"still-open-01"}


def test_purge_command_dry_run_then_for_real(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'database = "{db}"\n[privacy]\nclosed_events_days = 30\n' + CENTRAL_TOML)
    store = SqliteDatabase(db)
    # the CLI runs its own event loop: this test has none running
    env = asyncio.run(make_env())
    for device in env.store.database.devices():
        store.add_device(device, now_ms=0)
    now = wall_ms()
    for event_id, closed_days_ago in (("closed-long-ago", 31), ("closed-yesterday", 1)):
        store.add_event(env_incoming(event_id), now_ms=now)
        store.set_stage(event_id, "closed", now - closed_days_ago * DAY_MS, "central")
    store.close()
    runner = CliRunner()
    dry = runner.invoke(gateway, ["purge", "--config", str(config), "--dry-run"])
    assert dry.exit_code == 0 and "would delete 1 event(s)" in dry.output, dry.output
    done = runner.invoke(gateway, ["purge", "--config", str(config)])
    assert done.exit_code == 0 and "deleted 1 event(s)" in done.output
    wider = runner.invoke(gateway, ["purge", "--config", str(config), "--days", "0.5"])
    assert "deleted 1 event(s)" in wider.output


def env_incoming(event_id: str) -> Incoming:
    return Incoming(event_id, "bell-0001", 1, "alert", 1, ALERT.model_dump_json(), "jws", ())


async def test_decommission_revokes_wipes_private_data_and_keeps_anonymised_history(
    tmp_path: Path,
) -> None:
    env = await make_env()
    await alerts(env, "alert-kept-01")
    create_key_file(tmp_path / "privacy.key")
    vault = open_vault(env.store, PrivacyConfig(key_file=tmp_path / "privacy.key"))
    await vault.put("bell-0001", PrivateData(address="somewhere 1", notes="n"), now_ms=1)
    refreshed: list[str] = []

    async def refresh(device_id: str) -> None:
        refreshed.append(device_id)

    api = Api(env.store, env.registry, env.downlink, env.metrics, PRIVACY_TOKENS)
    api.add_routes(PrivateRoutes(env.store, vault, on_revoked=refresh).routes())
    async with TestClient(TestServer(api.app())) as client:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with client.post("/admin/devices/bell-0001/decommission", headers=headers) as r:
            assert r.status == 200
        async with client.post("/admin/devices/bell-4242/decommission", headers=headers) as r:
            assert r.status == 404
    device = env.store.database.device("bell-0001")
    assert device is not None and device.revoked and device.label == ""
    assert env.store.database.private("bell-0001") is None and refreshed == ["bell-0001"]
    assert env.store.database.event("alert-kept-01") is not None  # the history stays
