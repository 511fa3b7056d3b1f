"""Releases and rollouts at the gateway: which devices, when offered, what their reports do,
and the admin routes (a release added, served with Range; a rollout started, paused, resumed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import ALERT, Env, make_env
from release_kit import make_bundle, release_signer

from gateway.api import Api
from gateway.config import ApiToken
from gateway.rollout import STATE_FILE, Releases, Rollout, RolloutRefused, Rollouts, chosen
from gateway.store import Device, Incoming
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import CommandMessage, Health

ADMIN = "admin-token-0123456789abc"
GANGNAM_ADMIN = "gangnam-admin-token-0123"
TOKENS = [
    ApiToken(name="installer", role="admin", token=ADMIN),
    ApiToken(name="gangnam-admin", role="admin", token=GANGNAM_ADMIN, districts=["gangnam"]),
]
# bell-0001 (mapo, the test kit's) and these: 20 active bells in mapo
MAPO = ["bell-0001", *(f"bell-{n:04d}" for n in range(100, 119))]
REOFFER_MS = 600_000


@dataclass
class Rig:
    env: Env
    rollouts: Rollouts
    signer: Signer
    tmp: Path

    def commands(self) -> list[tuple[str, dict[str, object]]]:
        return [
            (m.device, dict(m.body.args))
            for m in self.env.published()
            if isinstance(m, CommandMessage) and m.body.name == "update"
        ]

    async def report(
        self, device_id: str, event: str, detail: str, rollouts: Rollouts | None = None
    ) -> None:
        """A device's report kept by this gateway's intake (or another instance's)."""
        rollouts = rollouts or self.rollouts
        health = Health(event=event, detail=detail)  # type: ignore[arg-type]
        item = Incoming(
            f"rep-{device_id}-{len(detail)}-{event}", device_id, 1, "health",
            self.env.clock.ms, health.model_dump_json(), "jws", ("central",),
        )  # fmt: skip
        rollouts.kept([item])
        await rollouts.record_reports()

    async def current(self) -> Rollout:
        current = await self.rollouts.current()
        assert current is not None
        return current

    async def state(self, device_id: str) -> str:
        return (await self.current()).devices[device_id].state


def _rollouts(env: Env, releases: Releases) -> Rollouts:
    return Rollouts(
        releases,
        env.store,
        env.downlink.send,
        env.metrics,
        public_url="https://gw.test:8480",
        pause_failed_pct=10.0,
        reoffer_ms=REOFFER_MS,
        clock_ms=env.clock,
    )


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    env = await make_env()
    for device_id in MAPO[1:]:
        public = public_key_to_b64(generate_key().public_key())
        env.store.database.add_device(Device(device_id, public, "bell", "mapo"), now_ms=0)
    signer = release_signer()
    releases = Releases(tmp_path / "releases", signer.public_key)
    releases.add(make_bundle(tmp_path, signer, "2.0", min_version="1.0"))
    return Rig(env, _rollouts(env, releases), signer, tmp_path)


def test_the_share_chosen_is_stable_and_a_wider_step_keeps_the_first() -> None:
    tenth = chosen(MAPO, "2.0", 10)
    half = chosen(MAPO, "2.0", 50)
    assert len(tenth) == 2 and len(half) == 10
    assert set(tenth) <= set(half)
    assert chosen(reversed(MAPO), "2.0", 10) == tenth  # not by the order the store lists
    assert chosen(MAPO, "2.1", 50) != half  # each release spreads over other devices


async def test_a_rollout_offers_a_signed_update_to_its_share_of_the_district(rig: Rig) -> None:
    rollout = await rig.rollouts.start("2.0", "mapo", 25)
    assert sorted(rollout.devices) == sorted(chosen(MAPO, "2.0", 25))  # 5 of 20
    assert "bell-0003" not in rollout.devices  # revoked
    assert await rig.rollouts.tick() == 5
    url = "https://gw.test:8480/releases/2.0"
    assert sorted(rig.commands()) == sorted(
        (d, {"version": "2.0", "url": url}) for d in rollout.devices
    )
    assert await rig.rollouts.tick() == 0  # offered once, until the device says something
    rig.env.clock.ms += REOFFER_MS
    assert await rig.rollouts.tick() == 5  # silent devices (offline?) are offered again


async def test_never_offered_to_a_device_with_an_open_incident(rig: Rig) -> None:
    await rig.env.feed(rig.env.message(ALERT, "bell-0001"))  # an incident opens at bell-0001
    await rig.rollouts.start("2.0", "mapo", 100)
    await rig.rollouts.tick()
    assert "bell-0001" not in [d for d, _ in rig.commands()]
    assert await rig.state("bell-0001") == "pending"
    (incident,) = rig.env.store.database.incidents("open", 10, None)
    await rig.env.store.move_incident(incident.incident_id, "closed", rig.env.clock.ms, "desk")
    await rig.rollouts.tick()
    assert "bell-0001" in [d for d, _ in rig.commands()]


async def test_one_rollout_at_a_time(rig: Rig) -> None:
    await rig.rollouts.start("2.0", "mapo", 10)
    with pytest.raises(RolloutRefused) as caught:
        await rig.rollouts.start("2.0", "gangnam", 10)
    assert caught.value.status == 409
    await rig.rollouts.abort()
    await rig.rollouts.start("2.0", "gangnam", 10)  # the aborted one goes to history
    (earlier,) = await rig.rollouts.history()
    assert (earlier.district, earlier.state) == ("mapo", "aborted")


async def test_reports_move_devices_and_failures_pause_the_rollout(rig: Rig) -> None:
    await rig.rollouts.start("2.0", "mapo", 100)  # 20 devices: pauses at 2 failures
    await rig.rollouts.tick()
    a, b, c, d = MAPO[:4]
    await rig.report(a, "update_installed", "2.0")
    await rig.report(b, "update_failed", "2.0 incident_open: an incident is open")
    await rig.report(c, "update_failed", "2.0 rolled_back: health check failed: no acknowledged")
    await rig.report(d, "update_installed", "1.9")  # another version's news: not this rollout's
    states = [await rig.state(x) for x in (a, b, c, d)]
    assert states == ["installed", "pending", "failed", "offered"]
    assert (await rig.current()).state == "running"
    await rig.report(d, "update_failed", "2.0 hash_mismatch: changed in transit")
    assert (await rig.current()).state == "paused"
    assert "2 devices failed" in ((await rig.current()).paused_because or "")
    assert await rig.rollouts.tick() == 0  # b waits: nothing is offered while paused
    await rig.rollouts.resume()
    assert await rig.rollouts.tick() == 1  # b, offered again
    value = rig.env.metrics.registry.get_sample_value(
        "ansimi_update_reports_total", {"outcome": "failed"}
    )
    assert value == 2


async def test_a_resumed_rollout_is_paused_again_by_a_new_failure_not_by_an_install(
    rig: Rig,
) -> None:
    await rig.rollouts.start("2.0", "mapo", 100)  # 20 devices: pauses at 2 failures
    await rig.rollouts.tick()
    a, b, c, d = MAPO[:4]
    for device_id in (a, b):
        await rig.report(device_id, "update_failed", "2.0 rolled_back: health check failed")
    assert (await rig.current()).state == "paused"
    await rig.rollouts.resume()  # the admin looked at both failures and goes on
    await rig.report(c, "update_installed", "2.0")
    assert (await rig.current()).state == "running"
    await rig.report(d, "update_failed", "2.0 rolled_back: health check failed")
    assert (await rig.current()).state == "paused"
    assert "3 devices failed" in ((await rig.current()).paused_because or "")


async def test_a_rollout_is_done_when_every_device_installed_and_survives_a_restart(
    rig: Rig,
) -> None:
    await rig.rollouts.start("2.0", "mapo", 10)
    await rig.rollouts.tick()
    first = sorted((await rig.current()).devices)
    again = _rollouts(rig.env, rig.rollouts.releases)  # a gateway restart: the store has it
    current = await again.current()
    assert current is not None and sorted(current.devices) == first
    for device_id in first:
        await rig.report(device_id, "update_installed", "2.0", again)
    assert (await rig.current()).state == "done"
    with pytest.raises(RolloutRefused):  # done: nothing to resume, only to widen
        await again.resume()
    widened = await again.resume(50)  # the next step
    assert widened.state == "running" and len(widened.devices) == 10
    assert set(first) <= set(widened.devices)
    assert [widened.devices[d].state for d in first] == ["installed"] * len(first)


async def test_two_instances_on_one_store_run_one_rollout(rig: Rig) -> None:
    """A second gateway instance on the same store: it sees the rollout the first started,
    the devices' reports either one's intake keeps move it for both, a second start is
    refused by either, and each device is offered by one of them once."""
    other = _rollouts(rig.env, rig.rollouts.releases)
    await rig.rollouts.start("2.0", "mapo", 100)
    seen = await other.current()
    assert seen is not None and sorted(seen.devices) == sorted(MAPO)
    with pytest.raises(RolloutRefused) as caught:
        await other.start("2.0", "mapo", 50)
    assert caught.value.status == 409
    offered = [await rig.rollouts.tick(), await other.tick()]
    assert offered == [len(seen.devices), 0]  # claimed by the first: not offered twice
    assert len(rig.commands()) == len(seen.devices)
    await rig.report("bell-0001", "update_installed", "2.0", other)
    assert await rig.state("bell-0001") == "installed"
    await other.abort()
    assert (await rig.current()).state == "aborted"
    assert await rig.rollouts.tick() == 0


async def test_an_older_gateways_rollout_file_is_imported_once(rig: Rig) -> None:
    """rollout.json, as a gateway before the store kept rollouts wrote it: its current
    rollout runs on from the store, its history is kept, the file is renamed."""
    running = Rollout(
        id="2.0-mapo-5", version="2.0", district="mapo", percent=10, started_ms=5,
        devices={"bell-0001": {"state": "installed", "at_ms": 7, "offers": 1},
                 "bell-0100": {"state": "offered", "at_ms": 6, "offers": 1}},
    )  # fmt: skip
    older = Rollout(
        id="1.9-mapo-1", version="1.9", district="mapo", percent=100, state="done", started_ms=1
    )
    state = {"current": running.model_dump(), "history": [older.model_dump()]}
    path = rig.rollouts.releases.folder / STATE_FILE
    path.write_text(json.dumps(state))
    await rig.rollouts.import_file()
    assert (await rig.current()).model_dump() == running.model_dump()
    assert [r.id for r in await rig.rollouts.history()] == ["1.9-mapo-1"]
    assert not path.exists() and path.with_name("rollout.json.imported").exists()
    rig.env.clock.ms += REOFFER_MS
    assert await rig.rollouts.tick() == 1  # bell-0100, silent since the old gateway's offer
    path.write_text(json.dumps(state))  # the file again (a backup restored): not imported
    await rig.rollouts.import_file()
    assert len(await rig.rollouts.history()) == 1


async def test_a_rollout_file_import_cut_short_is_finished_at_the_next_start(rig: Rig) -> None:
    running = Rollout(id="2.0-mapo-5", version="2.0", district="mapo", percent=10, started_ms=5)
    older = Rollout(
        id="1.9-mapo-1", version="1.9", district="mapo", percent=100, state="done", started_ms=1
    )
    state = {"current": running.model_dump(), "history": [older.model_dump()]}
    (rig.rollouts.releases.folder / STATE_FILE).write_text(json.dumps(state))
    # the gateway stopped after importing the history, before the current one
    assert await rig.env.store.start_rollout(older.record(), older.device_updates())
    await rig.rollouts.import_file()
    assert (await rig.current()).id == "2.0-mapo-5"
    assert [r.id for r in await rig.rollouts.history()] == ["1.9-mapo-1"]


# ---- the routes ------------------------------------------------------------------------


@dataclass
class Http:
    rig: Rig
    client: TestClient[web.Request, web.Application]

    async def call(self, method: str, path: str, token: str | None = ADMIN, **kw: object):  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))  # type: ignore[arg-type]
        async with self.client.request(method, path, headers=headers, **kw) as response:  # type: ignore[arg-type]
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.read()


@pytest.fixture
async def http(rig: Rig) -> AsyncIterator[Http]:
    env = rig.env
    api = Api(env.store, env.registry, env.downlink, env.metrics, TOKENS, clock_ms=env.clock)
    api.add_routes(rig.rollouts.routes())
    async with TestClient(TestServer(api.app())) as client:
        yield Http(rig, client)


async def test_a_release_is_added_checked_and_served_with_range(http: Http) -> None:
    bundle = make_bundle(http.rig.tmp / "new", http.rig.signer, "2.1", min_version="1.0")
    status, body = await http.call("POST", "/admin/releases", data=bundle.read_bytes())
    assert status == 201 and body["version"] == "2.1"
    status, body = await http.call("GET", "/admin/releases")
    assert [r["version"] for r in body["releases"]] == ["2.0", "2.1"]
    data = bundle.read_bytes()
    status, tail = await http.call(
        "GET", "/releases/2.1", token=None, headers={"Range": "bytes=100-"}
    )
    assert status == 206 and tail == data[100:]
    status, _ = await http.call("GET", "/releases/9.9", token=None)
    assert status == 404


@pytest.mark.parametrize("wrong", ["key", "tampered"])
async def test_a_bad_bundle_is_refused_and_counted(http: Http, wrong: str) -> None:
    signer = release_signer() if wrong == "key" else http.rig.signer
    bundle = make_bundle(http.rig.tmp / "bad", signer, "2.2", min_version="1.0")
    data = bytearray(bundle.read_bytes())
    if wrong == "tampered":
        wheel = next((http.rig.tmp / "bad" / "wheels-2.2").iterdir()).read_bytes()
        data[bytes(data).index(wheel) + len(wheel) // 2] ^= 0xFF  # inside the wheel
    status, body = await http.call("POST", "/admin/releases", data=bytes(data))
    assert status == 400, body
    reason = {"key": "bad_signature", "tampered": "hash_mismatch"}[wrong]
    assert body["reason"] == reason
    assert http.rig.rollouts.releases.manifest("2.2") is None
    counted = http.rig.env.metrics.registry.get_sample_value(
        "ansimi_api_refused_total", {"reason": f"release_{reason}"}
    )
    assert counted == 1


async def test_rollouts_through_the_admin_routes(http: Http) -> None:
    start = {"version": "2.0", "district": "mapo", "percent": 10}
    status, _ = await http.call("POST", "/admin/rollouts", token=GANGNAM_ADMIN, json=start)
    assert status == 403  # not this token's district
    status, body = await http.call("POST", "/admin/rollouts", json=start)
    assert status == 201 and body["counts"]["pending"] == 2
    status, _ = await http.call("POST", "/admin/rollouts", json=start)
    assert status == 409
    # another district's admin neither sees mapo's rollout (its device ids) nor moves it
    status, body = await http.call("GET", "/admin/rollouts", token=GANGNAM_ADMIN)
    assert status == 200 and body["current"] is None and "bell-" not in str(body)
    for action in ("resume", "abort"):
        status, _ = await http.call("POST", f"/admin/rollouts/{action}", token=GANGNAM_ADMIN)
        assert status == 404
    # nor learns of it (its district, version and id) by starting one of its own
    own = {"version": "2.0", "district": "gangnam", "percent": 10}
    status, body = await http.call("POST", "/admin/rollouts", token=GANGNAM_ADMIN, json=own)
    assert status == 409 and "mapo" not in str(body)
    status, body = await http.call("POST", "/admin/rollouts/resume", json={"percent": 50})
    assert status == 200 and body["counts"]["pending"] == 10
    status, body = await http.call("GET", "/admin/rollouts")
    assert status == 200 and len(body["current"]["devices"]) == 10
    status, body = await http.call("POST", "/admin/rollouts/abort")
    assert status == 200 and body["state"] == "aborted"


async def test_a_not_now_answer_after_installed_leaves_the_device_installed(rig: Rig) -> None:
    await rig.rollouts.start("2.0", "mapo", 100)
    await rig.rollouts.tick()
    await rig.report("bell-0001", "update_installed", "2.0")
    await rig.report("bell-0001", "update_failed", "2.0 busy: an update to 2.0 is at step trial")
    assert await rig.state("bell-0001") == "installed"


async def test_a_version_names_one_set_of_wheels_for_good(http: Http) -> None:
    again = make_bundle(http.rig.tmp / "again", http.rig.signer, "2.0", min_version="1.0",
                        extra="CHANGED = True")  # fmt: skip
    status, body = await http.call("POST", "/admin/releases", data=again.read_bytes())
    assert status == 409 and body["reason"] == "not_newer"
    same = http.rig.rollouts.releases.path("2.0").read_bytes()
    status, _ = await http.call("POST", "/admin/releases", data=same)
    assert status == 201  # the same bundle again is no change
