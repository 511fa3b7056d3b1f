"""Test presses followed to the end: late ones become maintenance events naming the stage."""

from __future__ import annotations

from aiohttp.test_utils import TestClient, TestServer
from gw_testkit import ROUTES, Env, due

from gateway.api import Api
from gateway.config import ApiToken
from gateway.intake import Intake
from gateway.testwatch import TestWatch
from protocol.messages import Alert, CommandMessage, Status, StatusMessage

WITHIN_MS = 600_000
TEST = Alert(bell="emergency", trigger="test")


def watched(env: Env, period_ms: int | None = None) -> tuple[Intake, TestWatch]:
    """The env's intake again, telling a test watch what it keeps (as the service does)."""
    watch = TestWatch(
        env.store,
        env.downlink,
        env.metrics,
        route_of=env.route_of,
        complete_within_ms=WITHIN_MS,
        period_ms=period_ms,
        devices=env.registry.device_ids,
        clock_ms=env.clock,
        on_event=lambda: env.woken.append(-1),
    )
    return env.intake_with(on_kept=watch.kept), watch


def failed(env: Env) -> list[StatusMessage]:
    return env.gateway_statuses(due(env.store, env.clock.ms), "test_failed")


def outcome(env: Env, name: str) -> float | None:
    return env.metrics.registry.get_sample_value("ansimi_test_presses_total", {"outcome": name})


async def test_a_test_delivered_in_time_passes_and_tells_nobody(env: Env) -> None:
    intake, watch = watched(env)
    message = env.message(TEST)
    await intake.process([message])
    assert watch.under_way() == 1
    (delivery,) = {d.event_id for d in due(env.store, env.clock.ms)}
    watch.delivered(delivery)
    env.clock.ms += WITHIN_MS
    await watch.tick()
    assert failed(env) == [] and outcome(env, "passed") == 1.0 and watch.under_way() == 0


async def test_a_test_received_and_never_delivered_stopped_at_the_centre(env: Env) -> None:
    intake, watch = watched(env)
    await intake.process([env.message(TEST)])
    env.clock.ms += WITHIN_MS - 1
    await watch.tick()
    assert failed(env) == []
    env.clock.ms += 1
    await watch.tick()
    await watch.tick()  # told once
    messages = failed(env)
    # one event per centre of the bell's district, signed by the gateway, about the bell
    assert len(messages) == len(ROUTES["mapo"]) and len({m.id for m in messages}) == 1
    assert messages[0].device == "bell-0001"
    assert messages[0].body == Status(state="test_failed", stage="centre")
    assert outcome(env, "centre") == 1.0 and -1 in env.woken
    # the fleet view says so until a test of the bell comes through
    assert watch.failed == {"bell-0001": "centre"}
    await intake.process([env.message(TEST)])
    (test_id,) = watch._kept
    watch.delivered(test_id)
    assert watch.failed == {}


async def test_a_test_asked_for_and_never_received_stopped_at_the_link(env: Env) -> None:
    _, watch = watched(env)
    watch.asked("bell-0001")
    env.clock.ms += WITHIN_MS
    await watch.tick()
    (message, *_) = failed(env)
    assert message.body == Status(state="test_failed", stage="link")
    assert outcome(env, "link") == 1.0


async def test_a_test_asked_for_that_arrives_is_followed_to_the_centre_instead(env: Env) -> None:
    intake, watch = watched(env)
    watch.asked("bell-0001")
    env.clock.ms += WITHIN_MS - 1
    await intake.process([env.message(TEST)])
    env.clock.ms += 1
    await watch.tick()
    assert failed(env) == [] and watch.under_way() == 1


async def test_other_alerts_are_not_followed(env: Env) -> None:
    intake, watch = watched(env)
    await intake.process([env.message(Alert(bell="emergency", trigger="press"))])
    assert watch.under_way() == 0


async def test_an_admin_asks_a_bell_for_a_test_press_through_the_api(env: Env) -> None:
    _, watch = watched(env)
    admin, operator = "admin-token-0123456789", "operator-token-0123456"
    tokens = [
        ApiToken(name="installer", role="admin", token=admin),
        ApiToken(name="desk", role="operator", token=operator),
    ]
    api = Api(env.store, env.registry, env.downlink, env.metrics, tokens, connected=lambda: True)
    api.add_routes(watch.routes())
    async with TestClient(TestServer(api.app())) as client:

        async def ask(device_id: str, token: str) -> int:
            path = f"/admin/devices/{device_id}/test-press"
            headers = {"Authorization": f"Bearer {token}"}
            async with client.post(path, headers=headers) as response:
                return response.status

        assert await ask("bell-0001", operator) == 403
        assert await ask("bell-0003", admin) == 404  # revoked
        assert await ask("bell-0001", admin) == 200
    (command,) = [m for m in env.published() if isinstance(m, CommandMessage)]
    assert (command.device, command.body.name) == ("bell-0001", "test_press")
    assert watch.under_way() == 1


async def test_a_bell_whose_scheduled_test_never_comes_stopped_at_the_link(env: Env) -> None:
    week = 7 * 86_400_000
    intake, watch = watched(env, period_ms=week)
    env.clock.ms += week // 2
    await intake.process([env.message(TEST, device="bell-0002")])  # bell-0002 tests
    env.clock.ms += week // 2 + WITHIN_MS - 1
    await watch.tick()
    # bell-0002's test was never delivered: that one is at the centre
    assert [m.device for m in failed(env) if m.body.stage == "link"] == []
    env.clock.ms += 1
    await watch.tick()
    await watch.tick()  # told once per period missed
    link = {m.id: m.device for m in failed(env) if m.body.stage == "link"}
    # bell-0001 sent none; bell-0003 is revoked; bell-0002's came half a week ago
    assert list(link.values()) == ["bell-0001"]  # one event (for each of mapo's centres)
