"""The secondary (SMS) path supervised from heartbeats: one down and one up per outage."""

from __future__ import annotations

from gw_testkit import GATEWAY, GATEWAY_KEY, ROUTES, Env, due

from gateway.intake import Intake
from gateway.secondary import DOWN, UP, SecondaryPathWatch
from gateway.store import Event
from protocol.envelope import open_envelope
from protocol.messages import Heartbeat, SecondaryPath, StatusMessage

WORKING = SecondaryPath(modem=True, sim="ready", registered=True, signal=60, numbers=1)
SEARCHING = SecondaryPath(modem=True, sim="ready", registered=False, signal=0, numbers=1)
NO_NUMBERS = SecondaryPath(modem=True, sim="ready", registered=True, signal=60, numbers=0)


def watched(env: Env, *, confirm: int = 2) -> tuple[Intake, SecondaryPathWatch]:
    """The env's intake again, with a secondary path watch hooked in."""
    watch = SecondaryPathWatch(
        env.store,
        env.downlink,
        env.metrics,
        route_of=env.route_of,
        confirm=confirm,
        clock_ms=env.clock,
        on_event=lambda: env.woken.append(-1),
    )
    return env.intake_with(supervisor=env.supervisor, secondary=watch), watch


def beat(health: SecondaryPath | None) -> Heartbeat:
    return Heartbeat(uptime_s=1, power="mains", firmware="1.0", secondary=health)


async def feed(env: Env, intake: Intake, *healths: SecondaryPath | None) -> None:
    for health in healths:
        env.clock.ms += 10_000
        await intake.process([env.message(beat(health))])


def secondary_events(env: Env) -> list[Event]:
    events = reversed(env.store.database.events(None, 100_000, type="status"))
    return [e for e in events if '"secondary_path_' in e.body_json]


def states(env: Env) -> list[str]:
    return [e.body_json.split('"')[3] for e in secondary_events(env)]


async def test_one_down_and_one_up_per_outage(env: Env) -> None:
    intake, _ = watched(env)
    await feed(env, intake, WORKING, WORKING)
    assert states(env) == []
    await feed(env, intake, SEARCHING)
    assert states(env) == []  # one bad heartbeat is not an outage yet
    await feed(env, intake, SEARCHING, SEARCHING, SEARCHING)
    assert states(env) == [DOWN]  # and reported once, however long it lasts
    await feed(env, intake, WORKING, WORKING, WORKING)
    assert states(env) == [DOWN, UP]
    assert (
        env.metrics.registry.get_sample_value("ansimi_supervision_events_total", {"event": DOWN})
        == 1.0
    )
    assert -1 in env.woken  # the forwarder was told


async def test_the_events_are_signed_by_the_gateway_and_routed_like_the_device(env: Env) -> None:
    intake, _ = watched(env, confirm=1)
    await feed(env, intake, NO_NUMBERS)  # a bell with no SMS numbers has no second path
    (event,) = secondary_events(env)
    deliveries = [d for d in due(env.store, env.clock.ms, 10) if d.event_id == event.event_id]
    assert {d.centre for d in deliveries} == set(ROUTES["mapo"])  # bell-0001 is in mapo
    opened = open_envelope(deliveries[0].jws, {GATEWAY: GATEWAY_KEY.public_key()}.__getitem__)
    assert opened.kid == GATEWAY
    assert isinstance(opened.message, StatusMessage)
    assert (opened.message.device, opened.message.body.state) == ("bell-0001", DOWN)


async def test_a_flap_shorter_than_confirm_reports_nothing(env: Env) -> None:
    intake, _ = watched(env)
    await feed(env, intake, WORKING, SEARCHING, WORKING, SEARCHING, WORKING)
    assert states(env) == []


async def test_heartbeats_of_older_agents_judge_nothing(env: Env) -> None:
    intake, watch = watched(env, confirm=1)
    await feed(env, intake, None, None)
    assert states(env) == [] and not watch.is_down("bell-0001")


async def test_a_restarted_gateway_does_not_report_the_same_outage_twice(env: Env) -> None:
    intake, _ = watched(env, confirm=1)
    await feed(env, intake, SEARCHING)
    assert states(env) == [DOWN]
    intake, restarted = watched(env, confirm=1)
    await restarted.load_from(env.store)
    assert restarted.is_down("bell-0001")
    await feed(env, intake, SEARCHING, WORKING)
    assert states(env) == [DOWN, UP]
