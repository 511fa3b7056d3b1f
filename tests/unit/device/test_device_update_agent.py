"""The agent's side of an update: offers refused during an incident, the switch asks for a
restart, and a trial commits only once its report is acknowledged, else rolls back."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path

import pytest
from release_kit import (
    Clock,
    factory_and_bundle,
    file_fetch,
    running_version,
    unzip_install,
)

from ansimi.files import write_atomic
from device import update
from device.agent import Agent
from device.config import DeviceConfig
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs
from device.hal.ports import InputEvent
from device.update import RestartRequested, Updater
from protocol.jws import Signer
from protocol.keys import generate_key
from protocol.messages import Ack, Command, build_message

GATEWAY = Signer("gw-test", generate_key())
DEVICE = Signer("bell-0001", generate_key())
UPDATE = Command(name="update", args={"version": "2.0", "url": "https://gw.test/r/2.0"})


@pytest.fixture
def opt(tmp_path: Path) -> tuple[Path, Path, Signer]:
    return factory_and_bundle(tmp_path)


def _agent(tmp_path: Path, opt: tuple[Path, Path, Signer], clock: Clock, trial_s: float) -> Agent:
    root, bundle, signer = opt
    config = DeviceConfig.model_validate({"device": {"id": "bell-0001", "state_dir": tmp_path}})
    updater = Updater(
        root,
        signer.public_key,
        fetch=file_fetch(bundle, lambda _name: None),
        install=unzip_install,
        clock_ms=clock,
        trial_s=trial_s,
        running=lambda: running_version(root),  # what the launcher would have started
    )
    hardware = Hardware(FakeInputs(on_mains=True), FakeIndicator(), None, None)
    return Agent(
        config, signer=DEVICE, gateway_key=GATEWAY.public_key, hardware=hardware, updater=updater
    )


def _health(agent: Agent) -> list[dict[str, str]]:
    kept = [e for e in agent.outbox.pending() if e.type == "health"]
    return [json.loads(e.body_json) | {"id": e.id} for e in kept]


async def _until(predicate) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(10):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_an_offer_during_an_incident_is_refused_and_reported(tmp_path: Path, opt) -> None:
    agent = _agent(tmp_path, opt, Clock(), 60.0)
    assert agent.updates is not None
    agent.on_input(InputEvent("emergency", "pressed"))
    agent.on_command(UPDATE)
    (report,) = _health(agent)
    assert report["event"] == "update_failed" and "incident_open" in report["detail"]
    assert agent.updates.updater.journal() is None
    agent.outbox.close()


async def _switch(tmp_path: Path, opt, clock: Clock, trial_s: float) -> None:  # type: ignore[no-untyped-def]
    agent = _agent(tmp_path, opt, clock, trial_s)
    assert agent.updates is not None
    agent.on_command(UPDATE)
    with pytest.raises(RestartRequested):
        async with asyncio.timeout(10):
            await agent.updates.run()
    agent.outbox.close()
    agent.updates.updater.boot()  # what the launcher does before the next start
    assert running_version(opt[0]) == "2.0"


async def _in_trial(tmp_path: Path, opt, clock: Clock, trial_s: float) -> Agent:  # type: ignore[no-untyped-def]
    """An update switched to and restarted into: the agent of the new version's first start."""
    await _switch(tmp_path, opt, clock, trial_s)
    agent = _agent(tmp_path, opt, clock, trial_s)
    assert agent.updates is not None
    return agent


async def _until_restart(agent: Agent) -> None:
    assert agent.updates is not None
    with pytest.raises(RestartRequested):
        async with asyncio.timeout(10):
            await agent.updates.run()


async def test_a_trial_commits_once_its_report_is_acknowledged(tmp_path: Path, opt) -> None:
    clock = Clock()
    agent = await _in_trial(tmp_path, opt, clock, 60.0)
    assert agent.updates is not None
    agent.ready.set()  # connected
    task = asyncio.create_task(agent.updates.run())
    await _until(lambda: any(h["event"] == "update_installed" for h in _health(agent)))
    (report,) = [h for h in _health(agent) if h["event"] == "update_installed"]
    assert report["detail"] == "2.0"
    assert agent.updates.updater.journal() is not None  # not before the acknowledgement
    for listener in agent.on_ack:
        listener(Ack(ref=report["id"], stage="received"))
    await _until(lambda: agent.updates.updater.journal() is None)  # type: ignore[union-attr]
    assert running_version(opt[0]) == "2.0"
    task.cancel()
    agent.outbox.close()


async def test_a_trial_without_its_acknowledgement_rolls_back_and_says_why(
    tmp_path: Path, opt
) -> None:
    clock = Clock()
    agent = await _in_trial(tmp_path, opt, clock, 0.2)
    assert agent.updates is not None
    agent.ready.set()
    await _until_restart(agent)
    assert running_version(opt[0]) == "1.0"
    agent.outbox.close()
    # the previous version starts again and reports the rollback with the reason
    agent.updates.updater.boot()
    after = _agent(tmp_path, opt, clock, 0.2)
    assert after.updates is not None
    task = asyncio.create_task(after.updates.run())
    await _until(lambda: any(h["event"] == "update_failed" for h in _health(after)))
    (failed,) = [h for h in _health(after) if h["event"] == "update_failed"]
    assert failed["detail"].startswith("2.0 rolled_back: health check failed: no acknowledged")
    assert after.updates.updater.journal() is None
    assert sorted(p.name for p in (opt[0] / "versions").iterdir()) == ["1.0"]
    task.cancel()
    after.outbox.close()


async def test_heartbeats_report_the_version_the_launcher_started(tmp_path: Path, opt) -> None:
    """Not device.toml's `[device] firmware`: the fleet view and rollouts see what runs."""
    clock = Clock()
    before = _agent(tmp_path, opt, clock, 0.2)
    assert before.heartbeat().firmware == "1.0"
    before.outbox.close()
    agent = await _in_trial(tmp_path, opt, clock, 0.2)
    assert agent.heartbeat().firmware == "2.0"
    assert agent.updates is not None
    agent.ready.set()
    await _until_restart(agent)  # nothing acknowledges its report: back to 1.0
    agent.outbox.close()
    agent.updates.updater.boot()
    after = _agent(tmp_path, opt, clock, 0.2)
    assert after.heartbeat().firmware == "1.0"
    after.outbox.close()


async def test_the_switch_waits_for_an_open_incident_to_close(tmp_path: Path, opt) -> None:
    agent = _agent(tmp_path, opt, Clock(), 60.0)
    assert agent.updates is not None
    agent.updates._busy_poll_s = 0.01
    agent.on_command(UPDATE)  # offered while idle: taken
    agent.on_input(InputEvent("emergency", "pressed"))  # then someone presses
    (alert_id,) = [e.id for e in agent.outbox.pending() if e.type == "alert"]
    run = asyncio.create_task(agent.updates.run())
    updater = agent.updates.updater
    await _until(lambda: getattr(updater.journal(), "step", None) == "installed")
    await asyncio.sleep(0.1)
    assert not run.done() and running_version(opt[0]) == "1.0"  # installed, not switched
    closed = Ack(ref=alert_id, stage="closed")  # the desk closed it
    agent._on_down(build_message(closed, device="bell-0001", seq=1, ts=1))
    with pytest.raises(RestartRequested):
        async with asyncio.timeout(10):
            await run
    agent.outbox.close()
    updater.boot()
    assert running_version(opt[0]) == "2.0"


async def test_a_late_offer_of_the_running_version_is_answered_installed_again(
    tmp_path: Path, opt
) -> None:
    """Offered again (its report lost at a gateway that crashed before noting it): not
    installed twice, but said again, so the rollout does not wait for it for ever."""
    clock = Clock()
    agent = await _in_trial(tmp_path, opt, clock, 60.0)
    assert agent.updates is not None
    journal = agent.updates.updater.journal()
    assert journal is not None
    agent.updates.updater.commit(journal)
    agent.on_command(UPDATE)
    assert agent.updates.updater.journal() is None
    (report,) = _health(agent)
    assert (report["event"], report["detail"]) == ("update_installed", "2.0")
    agent.outbox.close()


async def test_a_trial_is_not_committed_by_code_the_launcher_did_not_start(
    tmp_path: Path, opt
) -> None:
    clock = Clock()
    agent = await _in_trial(tmp_path, opt, clock, 60.0)
    assert agent.updates is not None
    agent.updates.updater.running = lambda: "1.0"  # `ansimi device run` by hand: the old code
    agent.ready.set()
    await _until_restart(agent)
    journal = agent.updates.updater.journal()
    assert journal is not None and journal.step == "rolled_back"
    assert "ansimi device launch" in (journal.reason or "")
    assert running_version(opt[0]) == "1.0"
    agent.outbox.close()


async def test_a_device_not_set_up_for_updates_says_so(tmp_path: Path) -> None:
    config = DeviceConfig.model_validate({"device": {"id": "bell-0001", "state_dir": tmp_path}})
    hardware = Hardware(FakeInputs(on_mains=True), FakeIndicator(), None, None)
    agent = Agent(config, signer=DEVICE, gateway_key=GATEWAY.public_key, hardware=hardware)
    agent.on_command(UPDATE)
    (report,) = _health(agent)
    assert report["event"] == "update_failed"
    assert report["detail"].startswith("2.0 not_set_up:")
    agent.outbox.close()


async def test_an_update_root_without_its_current_link_says_not_set_up(tmp_path: Path, opt) -> None:
    # an [update] root the installer did not finish: said, or the rollout offers it for ever
    agent = _agent(tmp_path, opt, Clock(), 60.0)
    (opt[0] / "current").unlink()
    agent.on_command(UPDATE)
    (report,) = _health(agent)
    assert report["event"] == "update_failed"
    assert report["detail"].startswith("2.0 not_set_up:")
    agent.outbox.close()


async def test_a_switch_the_full_disk_cannot_journal_is_dropped_and_reported(
    tmp_path: Path, opt, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = _agent(tmp_path, opt, Clock(), 60.0)
    assert agent.updates is not None

    def full_at_the_trial(path: Path, data: bytes, **kw: object) -> None:
        if b'"trial"' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_atomic(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(update, "write_atomic", full_at_the_trial)
    agent.on_command(UPDATE)
    run = asyncio.create_task(agent.updates.run())
    await _until(lambda: any(h["event"] == "update_failed" for h in _health(agent)))
    assert not run.done()  # the agent runs on, on the version it had
    run.cancel()
    (report,) = _health(agent)
    assert report["detail"].startswith("2.0 storage_failed:")
    assert agent.updates.updater.journal() is None and running_version(opt[0]) == "1.0"
    assert [p.name for p in (opt[0] / "versions").iterdir()] == ["1.0"]
    agent.outbox.close()
