"""Remote config at the gateway: layers merged per device, sent signed, drift, the API."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner
from gw_testkit import ADMIN, CENTRAL, GANGNAM, KEYS, PRIVACY_TOKENS, Env, heartbeat, make_env

from ansimi_edge.cli import cli
from gateway.api import Api
from gateway.config import ApiToken
from gateway.intake import KeptHeartbeat
from gateway.remote_config import RemoteConfigs
from gateway.store import Device
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import CommandMessage
from protocol.remote_config import config_hash
from protocol.sealed_numbers import BadNumbers, open_numbers

RESEND_MS = 600_000


def configs(env: Env) -> RemoteConfigs:
    def devices() -> list[Device]:
        found = (env.registry.device(d) for d in env.registry.device_ids())
        return [d for d in found if d is not None]

    return RemoteConfigs(
        env.store,
        env.downlink,
        env.metrics,
        devices=devices,
        resend_after_ms=RESEND_MS,
        clock_ms=env.clock,
    )


async def served(
    tokens: list[ApiToken] = PRIVACY_TOKENS,
) -> tuple[Env, RemoteConfigs, TestClient[Any, Any]]:
    """A gateway's insides with the remote config routes on its API, not yet started."""
    env = await make_env()
    remote = configs(env)
    await remote.load()
    api = Api(env.store, env.registry, env.downlink, env.metrics, tokens, connected=lambda: True)
    api.add_routes(remote.routes())
    return env, remote, TestClient(TestServer(api.app()))


def commands(env: Env) -> list[tuple[str, dict[str, dict[str, object]] | None]]:
    return [
        (m.device, m.body.config)
        for m in env.published()
        if isinstance(m, CommandMessage) and m.body.name == "set_config"
    ]


def beat(env: Env, device_id: str, patch: dict[str, dict[str, object]]) -> KeptHeartbeat:
    body = heartbeat().model_copy(update={"config_hash": config_hash(patch)})
    return KeptHeartbeat(device_id, env.clock.ms, body)


async def test_each_device_is_sent_the_site_then_district_then_device_layers() -> None:
    env = await make_env()
    remote = configs(env)
    await remote.load()
    assert await remote.set_layer("site", "", {"mqtt": {"heartbeat_s": 30.0}}) == 2
    await remote.set_layer("district", "mapo", {"mqtt": {"heartbeat_s": 20.0}})
    await remote.set_layer("device", "bell-0002", {"behaviour": {"ring_link_s": 5.0}})
    # the site's layer went to both live bells (bell-0003 is revoked); then mapo's to mapo's
    # one; then bell-0002's own: each time the whole merged config, not the layer alone
    assert commands(env) == [
        ("bell-0001", {"mqtt": {"heartbeat_s": 30.0}}),
        ("bell-0002", {"mqtt": {"heartbeat_s": 30.0}}),
        ("bell-0001", {"mqtt": {"heartbeat_s": 20.0}}),
        ("bell-0002", {"mqtt": {"heartbeat_s": 30.0}, "behaviour": {"ring_link_s": 5.0}}),
    ]
    # kept: a gateway started again on the same store knows the same
    again = configs(env)
    await again.load()
    assert [r.desired_hash for r in again.drift()] == [r.desired_hash for r in remote.drift()]
    await remote.set_layer("district", "mapo", None)
    assert commands(env)[-1] == ("bell-0001", {"mqtt": {"heartbeat_s": 30.0}})


async def test_drift_is_reported_hash_against_desired_and_resent_at_most_once_a_period() -> None:
    env = await make_env()
    remote = configs(env)
    await remote.load()
    wanted = {"behaviour": {"ring_link_s": 60.0}}
    await remote.set_layer("district", "mapo", wanted)
    assert [(r.device_id, r.state) for r in remote.drift()] == [
        ("bell-0001", "unknown"),
        ("bell-0002", "unknown"),
    ]
    sent = len(commands(env))
    remote.heartbeats([beat(env, "bell-0001", wanted), beat(env, "bell-0002", {})])
    await remote.flush()
    assert {r.device_id: r.state for r in remote.drift()} == {
        "bell-0001": "in_sync",
        "bell-0002": "in_sync",  # nothing desired for gangnam: the empty config is right
    }
    # bell-0001 rolled the config back: drift; sent just now, so not sent again yet
    remote.heartbeats([beat(env, "bell-0001", {})])
    await remote.flush()
    assert {r.device_id: r.state for r in remote.drift()}["bell-0001"] == "drift"
    assert len(commands(env)) == sent
    assert (await env.store.reported_configs())["bell-0001"] == (config_hash({}), env.clock.ms)
    # a period later, its next heartbeat, the same hash again (offline when the config was
    # sent, say), is answered with the config again, once
    env.clock.ms += RESEND_MS
    remote.heartbeats([beat(env, "bell-0001", {}), beat(env, "bell-0001", {})])
    await remote.flush()
    assert commands(env)[sent:] == [("bell-0001", wanted)]
    remote.heartbeats([beat(env, "bell-0001", {})])
    await remote.flush()
    assert commands(env)[sent:] == [("bell-0001", wanted)]


async def test_a_held_heartbeat_s_hash_is_reported_as_of_its_arrival() -> None:
    env = await make_env()
    remote = configs(env)
    await remote.load()
    arrived = env.clock.ms
    held = beat(env, "bell-0001", {})._replace(arrived_ms=arrived)
    env.clock.ms += 9_000  # kept by the intake's heartbeat flush, 9 s later
    remote.heartbeats([held])
    await remote.flush()
    assert (await env.store.reported_configs())["bell-0001"] == (config_hash({}), arrived)


async def test_the_api_sets_layers_within_the_token_s_districts_and_refuses_bad_keys() -> None:
    env, _remote, client = await served()
    async with client:

        def auth(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        put = await client.put(
            "/admin/config/district/mapo",
            json={"behaviour": {"ring_link_s": 30}},
            headers=auth(ADMIN),
        )
        assert put.status == 200
        assert (await put.json())["devices_sent"] == 1
        refused = await client.put(
            "/admin/devices/bell-0001/config",
            json={"device": {"id": "bell-9"}},
            headers=auth(ADMIN),
        )
        assert refused.status == 400
        assert (await refused.json())["error"] == "[device] id cannot be set remotely"
        bad = "ansimi_api_refused_total"
        assert env.metrics.registry.get_sample_value(bad, {"reason": "bad_config"}) == 1
        unknown = await client.put("/admin/config/district/mapoo", json={}, headers=auth(ADMIN))
        assert unknown.status == 400 and "mapo" in (await unknown.json())["error"]
        missing = await client.put("/admin/devices/bell-0404/config", json={}, headers=auth(ADMIN))
        assert missing.status == 404
        # operators read drift, each desk its own districts; they cannot set layers
        drift = await client.get("/config/drift", headers=auth(GANGNAM))
        assert [r["device_id"] for r in (await drift.json())["devices"]] == ["bell-0002"]
        drift = await client.get("/config/drift", headers=auth(CENTRAL))
        rows = {r["device_id"]: r for r in (await drift.json())["devices"]}
        assert rows["bell-0001"]["desired_hash"] == config_hash({"behaviour": {"ring_link_s": 30}})
        denied = await client.put("/admin/config/site", json={}, headers=auth(CENTRAL))
        assert denied.status == 403
        layers = await client.get("/admin/config", headers=auth(ADMIN))
        assert (await layers.json())["layers"] == [
            {
                "scope": "district",
                "name": "mapo",
                "config": {"behaviour": {"ring_link_s": 30}},
                "hash": config_hash({"behaviour": {"ring_link_s": 30}}),
            }
        ]


async def put_numbers(client: TestClient[Any, Any], numbers: list[str]) -> ClientResponse:
    """bell-0001's own layer: these SMS numbers and a timing, as an admin sets them."""
    return await client.put(
        "/admin/devices/bell-0001/config",
        json={"sms": {"numbers": numbers, "after_s": 20.0}},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


async def test_sms_numbers_are_sealed_to_the_device_and_never_kept_in_clear() -> None:
    env, remote, client = await served()
    numbers = ["+821012345678", "+82212345678"]
    async with client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        put = await put_numbers(client, numbers)
        assert put.status == 200, await put.text()
        (layer,) = await env.store.config_layers()
        assert all(n not in layer.patch_json for n in numbers)
        ((device_id, sent),) = commands(env)
        assert device_id == "bell-0001" and sent is not None
        sealed = sent["sms"].pop("numbers_from_gateway")
        assert sent == {"sms": {"after_s": 20.0}}
        # only that device opens them; the hash the drift compares is the sealed value's
        assert isinstance(sealed, str) and open_numbers(sealed, KEYS["bell-0001"]) == numbers
        with pytest.raises(BadNumbers):
            open_numbers(sealed, KEYS["bell-0002"])
        assert remote.drift()[0].desired_hash == config_hash(json.loads(layer.patch_json))
        # one sealed value opens on one device: never in a district's or the site's layer
        district = await client.put(
            "/admin/config/district/mapo", json={"sms": {"numbers": numbers}}, headers=auth
        )
        assert district.status == 400
        assert "only in a device's own layer" in (await district.json())["error"]
        copied = {"sms": {"numbers_from_gateway": sealed}}
        site = await client.put("/admin/config/site", json=copied, headers=auth)
        assert site.status == 400
        bad = await client.put(
            "/admin/devices/bell-0001/config",
            json={"sms": {"numbers": ["+82 10 1234"]}},
            headers=auth,
        )
        assert bad.status == 400
        assert (await bad.json())["error"].startswith("[sms] numbers: number 1 of 1 is not")
        assert len(commands(env)) == 1


GANGNAM_ADMIN = "gangnam-admin-token-0123"


async def test_an_admin_lists_only_the_layers_of_its_own_districts() -> None:
    # a device layer names a device of another district (and shows its config)
    tokens = [
        *PRIVACY_TOKENS,
        ApiToken(name="gangnam-admin", role="admin", token=GANGNAM_ADMIN, districts=["gangnam"]),
    ]
    _env, remote, client = await served(tokens)
    async with client:
        await remote.set_layer("site", "", {"behaviour": {"ring_link_s": 20}})
        await remote.set_layer("district", "mapo", {"behaviour": {"ring_link_s": 30}})
        await remote.set_layer("device", "bell-0001", {"device": {"silent": True}})
        await remote.set_layer("district", "gangnam", {"behaviour": {"ring_link_s": 40}})
        await remote.set_layer("device", "bell-0002", {"device": {"silent": True}})

        async def listed(token: str) -> list[tuple[str, str]]:
            answer = await client.get("/admin/config", headers={"Authorization": f"Bearer {token}"})
            assert answer.status == 200
            return [(layer["scope"], layer["name"]) for layer in (await answer.json())["layers"]]

        assert await listed(GANGNAM_ADMIN) == [
            ("device", "bell-0002"),
            ("district", "gangnam"),
            ("site", ""),
        ]
        assert len(await listed(ADMIN)) == 5


async def test_the_cli_sets_a_layer_from_toml_shows_it_and_exits_5_on_drift(
    tmp_path: Path,
) -> None:
    env, remote, client = await served()
    layer = tmp_path / "mapo.toml"
    layer.write_text("[behaviour]\nring_link_s = 30.0\n\n[device]\nsilent = true\n")
    async with client:
        url = str(client.make_url("")).rstrip("/")

        async def provision(*args: str) -> tuple[int, str]:
            argv = ["provision", "config", *args, "--gateway", url]
            env_vars = {"ANSIMI_ADMIN_TOKEN": ADMIN}
            # the CLI blocks on its HTTP request: off the loop that serves the answer
            result = await asyncio.to_thread(CliRunner().invoke, cli, argv, env=env_vars)
            return result.exit_code, result.output

        code, out = await provision("set", "--district", "mapo", str(layer))
        wanted = {"behaviour": {"ring_link_s": 30.0}, "device": {"silent": True}}
        assert code == 0 and "1 devices sent their config" in out
        assert commands(env) == [("bell-0001", wanted)]
        code, out = await provision("show")
        assert code == 0 and "# district mapo" in out and "silent = true" in out
        # bell-0001 says it runs nothing yet: drift, and the exit code says so
        remote.heartbeats([beat(env, "bell-0001", {}), beat(env, "bell-0002", {})])
        await remote.flush()
        code, out = await provision("drift")
        assert code == 5 and "1 drifting" in out
        code, out = await provision("drift", "--district", "gangnam")
        assert code == 0 and "bell-0002" in out and "bell-0001" not in out
        code, out = await provision("set", "--district", "mapo", "--clear")
        assert code == 0 and commands(env)[-1] == ("bell-0001", {})


async def test_numbers_sealed_before_a_key_rotation_are_left_out_until_set_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env, remote, client = await served()
    # a second gateway instance on the same store, loaded before the rotation: it learns of
    # the new key only from its registry, as every instance does
    other = configs(env)
    numbers = ["+821012345678"]
    async with client:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        put = await put_numbers(client, numbers)
        assert put.status == 200, await put.text()
        await other.load()
        listed = await client.get("/admin/config", headers=auth)
        old_layer = (await listed.json())["layers"][0]["config"]
        assert "numbers_from_gateway" in old_layer["sms"]

        # `ansimi provision device rotate bell-0001`: the enrolment gives it a new key
        new_key = generate_key()
        token, _ = await env.store.issue_enrolment(
            "bell-0001", "bell", "", "", now_ms=env.clock.ms, rotate=True
        )
        await env.store.complete_enrolment(
            token, public_key_to_b64(new_key.public_key()), "serial-2", env.clock.ms
        )
        await env.registry.reload()
        device = env.registry.device("bell-0001")
        assert device is not None
        rest = {"sms": {"after_s": 20.0}}
        for instance in (remote, other):
            assert instance.desired(device) == rest  # never a value it cannot open
            (row, _) = instance.drift()
            assert row.numbers_needed and row.as_json()["numbers_needed"] is True
            assert row.desired_hash == config_hash(rest)
        # the agent, restarted with its new key, runs the rest (device/remote_config.py):
        # in sync, nothing resent
        sent_before = len(commands(env))
        remote.heartbeats([beat(env, "bell-0001", rest)])
        await remote.flush()
        assert len(commands(env)) == sent_before
        assert remote.drift()[0].state == "in_sync"
        assert "device bell-0001: its SMS numbers were sealed to a key it no longer" in caplog.text
        assert numbers[0] not in caplog.text
        listed = await client.get("/admin/config", headers=auth)
        (layer,) = (await listed.json())["layers"]
        assert layer["config"] == rest and layer["numbers_needed"] is True
        # the old value given back is refused: the gateway cannot tell it is stale otherwise
        again = await client.put("/admin/devices/bell-0001/config", json=old_layer, headers=auth)
        assert again.status == 400
        assert "give [sms] numbers in clear" in (await again.json())["error"]

        url = str(client.make_url("")).rstrip("/")
        argv = ["provision", "config", "drift", "--gateway", url]
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, argv, env={"ANSIMI_ADMIN_TOKEN": ADMIN}
        )
        assert result.exit_code == 5, result.output
        assert "ansimi provision config set --device bell-0001 FILE" in result.output
        assert "1 need their SMS numbers set again" in result.output
        argv = ["provision", "config", "show", "--gateway", url]
        result = await asyncio.to_thread(
            CliRunner().invoke, cli, argv, env={"ANSIMI_ADMIN_TOKEN": ADMIN}
        )
        assert result.exit_code == 0 and "add [sms] numbers" in result.output
        assert "numbers_from_gateway" not in result.output

        # set again: sealed to the new key, sent, and no longer needed
        put = await put_numbers(client, numbers)
        assert put.status == 200
        sealed = commands(env)[-1][1]["sms"]["numbers_from_gateway"]  # type: ignore[index]
        assert isinstance(sealed, str) and open_numbers(sealed, new_key) == numbers
        assert not remote.drift()[0].numbers_needed
        # a value sealed to the present key given back as listed is kept as it is
        listed = await client.get("/admin/config", headers=auth)
        same = await client.put(
            "/admin/devices/bell-0001/config",
            json=(await listed.json())["layers"][0]["config"],
            headers=auth,
        )
        assert same.status == 200 and not remote.drift()[0].numbers_needed
