"""`ansimi demo`: broker, gateway, control-centre console and a few bells on one machine.

Each part runs as it would in the field: the gateway and the console as their own
processes (`ansimi gateway run`, `ansimi console`), the bells as real device agents on
fake hardware (doorbells with a synthetic camera). The console's page is at
http://127.0.0.1:8080; the demo creates an operator `demo` with a fresh password it
prints, and gives the console an operator token for the gateway's API, so acknowledging
on the page lights the bell, and a doorbell's video plays in the page. First a tour, one
step every few seconds, so a newcomer sees each kind on the desk (`TOUR`: a press, a silent
store robbery, a doorbell ring that becomes an emergency, a long press, a duress code, a
tamper, a power loss, a bell going offline and a test press, each on a bell of its own
where there are enough); then a press every few seconds on the bells whose card is a
person in trouble (the tamper, power, offline and test cards stay as they are). An
incident nobody acknowledges escalates every 30 s along the chain central -> police (both
this console). What each bell shows and what reaches the centre is printed.
Mosquitto where it is installed, else amqtt (MQTT 3.1.1 only, no shared subscriptions,
so the gateway then uses a plain subscription).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ansimi.broker import Mosquitto, MosquittoConfig, free_port, mosquitto_path
from ansimi.listen import PortTaken, check_free

if TYPE_CHECKING:  # imported when the demo runs: `ansimi --help` stays light
    from device.agent import Agent
    from device.hal.fakes import FakeIndicator, FakeInputs
    from protocol.messages import DeviceKind

log = logging.getLogger(__name__)


class DemoError(click.ClickException):
    """The demo cannot go on; the message says why and what to do."""


@dataclass(slots=True)
class DemoBell:
    """A real agent and the fake buttons and LED it was built with, which the demo presses
    and watches."""

    agent: Agent
    kind: DeviceKind
    inputs: FakeInputs
    indicator: FakeIndicator
    task: asyncio.Task[None] | None = None  # its agent running; None once the tour stops it


# Hold lengths shortened for the demo, so a long press and a duress code take seconds, not
# the field's 3 and 15 (docs/behaviour.md); the gestures are the same.
DEMO_HOLDS = {"long_press_s": 1.0, "cancel_hold_s": 2.0, "duress_hold_s": 3.0}
# The demo's bells beat every 2 s and the gateway calls one offline after 3 missed: the
# bell the tour stops shows offline within seconds.
DEMO_HEARTBEAT_S = 2.0
# An unacknowledged incident takes a step of the demo's chain this often (the field's 60 s
# default would hide it from a newcomer who watches for a minute)
DEMO_ESCALATE_AFTER_S = 30.0


async def _press(bell: DemoBell) -> int:
    bell.inputs.press("emergency")
    bell.inputs.release("emergency")
    return 1


async def _long_press(bell: DemoBell) -> int:
    await bell.inputs.hold("emergency", DEMO_HOLDS["long_press_s"] + 0.3)
    return 1  # the press goes out on the edge; urgency follows as its update


async def _ring_then_emergency(bell: DemoBell) -> int:
    # a visitor's ring, held on: an emergency linked to the ring
    await bell.inputs.hold("doorbell", DEMO_HOLDS["long_press_s"] + 0.3)
    return 0


async def _duress(bell: DemoBell) -> int:
    # an incident, then the button held to the duress length: it looks like a cancel on
    # the bell, and tells the centre the person is forced
    await _press(bell)
    await asyncio.sleep(1.0)
    await bell.inputs.hold("emergency", DEMO_HOLDS["duress_hold_s"] + 0.3)
    return 1


async def _tamper(bell: DemoBell) -> int:
    bell.inputs.open_tamper()
    return 0


async def _power_loss(bell: DemoBell) -> int:
    bell.inputs.lose_power()
    return 0


async def _go_offline(bell: DemoBell) -> int:
    task, bell.task = bell.task, None
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return 0


async def _test_press(bell: DemoBell) -> int:
    bell.agent.test_presses.press("command")
    return 0


@dataclass(frozen=True, slots=True)
class TourStep:
    says: str  # what the demo prints; the desk shows it in its own words
    device_kind: DeviceKind  # the kind of bell it prefers
    act: Callable[[DemoBell], Coroutine[Any, Any, int]]  # does it; the plain presses it made
    # its card is a person in trouble: the presses after the tour may go to its bell. Not
    # on the others: a press would make the tamper or power card an emergency (an incident
    # takes its worst kind) and the newcomer would no longer see that kind on the desk
    emergency: bool = True


# Every kind an operator meets, each on its own card (the test press shows among the device
# events, marked as a test: it opens no incident).
TOUR: tuple[TourStep, ...] = (
    TourStep("button pressed (a stalking bell)", "bell", _press),
    TourStep("button pressed (a store bell: a silent robbery)", "store", _press),
    TourStep("doorbell rung, then held: an emergency", "doorbell", _ring_then_emergency),
    TourStep("button held: a long press, urgent", "bell", _long_press),
    TourStep("pressed, then held to the duress length: a duress code", "bell", _duress),
    TourStep("case opened: tamper", "store", _tamper, emergency=False),
    TourStep("mains power lost: on battery", "doorbell", _power_loss, emergency=False),
    TourStep("stopped: the gateway will call it offline", "store", _go_offline, emergency=False),
    TourStep(
        "test press (asked for, as the gateway does on schedule)",
        "doorbell",
        _test_press,
        emergency=False,
    ),
)


def plan_tour(bells: list[DemoBell]) -> list[tuple[TourStep, DemoBell]]:
    """Each step on a bell not used yet, of its kind where one is left; the tour ends when
    every bell has had its step (a demo with few bells shows the first steps)."""
    plan: list[tuple[TourStep, DemoBell]] = []
    fresh = list(bells)
    for step in TOUR:
        if not fresh:
            break
        bell = next((b for b in fresh if b.kind == step.device_kind), fresh[0])
        fresh.remove(bell)
        plan.append((step, bell))
    return plan


def pressed_after_tour(
    bells: list[DemoBell], tour: list[tuple[TourStep, DemoBell]]
) -> list[DemoBell]:
    """The bells the demo presses once the tour is done: those whose step was an emergency,
    and those the tour did not reach (a demo with more bells than steps)."""
    kept_as_shown = [bell for step, bell in tour if not step.emergency]
    return [b for b in bells if not any(b is shown for shown in kept_as_shown)]


@contextlib.asynccontextmanager
async def broker(state: Path, kind: str) -> AsyncIterator[tuple[int, int]]:
    """Yields (port, MQTT version the gateway should use)."""
    if kind == "mosquitto" or (kind == "auto" and mosquitto_path() is not None):
        with Mosquitto(MosquittoConfig(state_dir=state / "broker")) as mosquitto:
            click.echo(f"[demo] mosquitto on 127.0.0.1:{mosquitto.port}")
            yield mosquitto.port, 5
        return
    from amqtt.broker import Broker

    port = free_port()
    embedded = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}})
    await embedded.start()
    click.echo(
        f"[demo] embedded amqtt on 127.0.0.1:{port} (MQTT 3.1.1, plain subscription)"
        + ("; install mosquitto for the real thing" if mosquitto_path() is None else "")
    )
    try:
        yield port, 311
    finally:
        await embedded.shutdown()


def gateway_toml(
    state: Path,
    mqtt_port: int,
    version: int,
    centre_url: str,
    secret: str,
    api_port: int,
    api_token: str,
    admin_token: str,
) -> str:
    shared = "gateways" if version == 5 else ""
    return f"""# written by `ansimi demo`
id = "gw-demo"
signing_key = "{state / "gateway" / "signing.key"}"
database = "{state / "gateway" / "gateway.db"}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
version = {version}
shared_group = "{shared}"

[api]
enabled = true
host = "127.0.0.1"
port = {api_port}

# the console's token: it calls the operator routes (stages, devices, WHEP) for its operators
[[api.tokens]]
name = "console"
role = "operator"
token = "{api_token}"

# the demo's own: it registers its bells as an installer would (POST /admin/devices)
[[api.tokens]]
name = "demo"
role = "admin"
token = "{admin_token}"

# the data key: the console shows each bell's (made-up) address
[privacy]
key_file = "{state / "gateway" / "privacy.key"}"

[video]
enabled = true
recordings_dir = "{state / "gateway" / "recordings"}"
# gateway, doorbells and the browser all on this machine
loopback_candidates = true

# the demo's bells beat every {DEMO_HEARTBEAT_S:g} s: a stopped one shows offline within seconds
[supervise]
heartbeat_s = {DEMO_HEARTBEAT_S}

[[centres]]
name = "central"
url = "{centre_url}"
secret = "{secret}"
districts = ["*"]

# the police request line: it gets an incident only when its escalation reaches it (the
# demo's console stands in for it)
[[centres]]
name = "police"
url = "{centre_url}"
secret = "{secret}"
districts = []

# an incident nobody acknowledges escalates by itself, soon enough for a newcomer to see
[incidents]
escalate_after_s = {{ default = {DEMO_ESCALATE_AFTER_S} }}
escalation = ["central", "police"]
"""


# near each demo district's centre: the desk's map places the made-up bells there
DEMO_PLACES = {"mapo": (37.56, 126.91), "gangnam": (37.50, 127.05),
               "jongno": (37.59, 126.98), "songpa": (37.50, 127.11)}  # fmt: skip


def add_operator(centre_db: Path, name: str, password: str, log_file: Path) -> None:
    """The console's own command, as an installer would run it (nothing imports console)."""
    with log_file.open("ab") as handle:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ansimi_edge",
                "console",
                "add-operator",
                name,
                "--db",
                str(centre_db),
            ],
            check=True,
            stdout=handle,
            stderr=handle,
            env={**os.environ, "ANSIMI_OPERATOR_PASSWORD": password},
        )


_children: list[subprocess.Popen[bytes]] = []


@atexit.register
def _stop_children() -> None:
    # a safety net: however the demo ends, the gateway and console it started end too
    for child in _children:
        if child.poll() is None:
            child.terminate()
    for child in _children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)


def spawn(args: list[str], log_file: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    handle = log_file.open("ab")
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "ansimi_edge", *args],
            stdout=None,  # the centre prints what arrives: let people see it
            stderr=handle,
            env={**os.environ, **env},
        )
        _children.append(child)
        return child
    finally:
        handle.close()


async def run_demo(
    state: Path,
    devices: int,
    duration_s: float,
    console_port: int,
    press_every_s: float,
    broker_kind: str = "auto",
) -> int:
    from ansimi.privacy import create_key_file
    from device.agent import Agent
    from device.config import (
        BehaviourSection,
        DeviceConfig,
        DeviceSection,
        GatewaySection,
        MqttSection,
    )
    from device.hal import Hardware
    from device.hal.camera import SyntheticCamera
    from device.hal.fakes import FakeIndicator, FakeInputs
    from device.video.config import VideoConfig as DeviceVideo
    from protocol.jws import Signer
    from protocol.keys import generate_key, public_key_to_b64, save_private_key
    from provisioning.gateway_admin import AdminClient
    from siteca.errors import ProvisioningError

    # ICE pair-by-pair chatter would bury what a newcomer wants to see
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if state.exists():
        shutil.rmtree(state)
    (state / "gateway").mkdir(parents=True)
    secret = secrets.token_urlsafe(24)
    api_token = secrets.token_urlsafe(24)
    admin_token = secrets.token_urlsafe(24)
    # a fresh password each run, printed once: the demo's state is throwaway
    operator_password = secrets.token_urlsafe(9)
    gateway_key = generate_key()
    save_private_key(state / "gateway" / "signing.key", gateway_key)
    gateway_signer = Signer("gw-demo", gateway_key)

    async with broker(state, broker_kind) as (mqtt_port, version):
        centre_url = f"http://127.0.0.1:{console_port}/events"
        api_port = free_port()
        config_path = state / "gateway.toml"
        config_path.write_text(
            gateway_toml(
                state, mqtt_port, version, centre_url, secret, api_port, api_token, admin_token
            )
        )

        create_key_file(state / "gateway" / "privacy.key")
        bells: list[DemoBell] = []
        # the gateway learns them once it is up, over its admin API (see below)
        registrations: list[tuple[str, str, str, str, str]] = []
        addresses: list[tuple[str, dict[str, Any]]] = []
        districts = itertools.cycle(["mapo", "gangnam", "jongno", "songpa"])
        kinds: itertools.cycle[DeviceKind] = itertools.cycle(["bell", "store", "doorbell"])
        for n in range(devices):
            kind = next(kinds)
            device_id = f"{kind}-{n + 1:04d}"
            key = generate_key()
            label = f"demo {kind} {n + 1}"
            district = next(districts)
            registrations.append(
                (device_id, public_key_to_b64(key.public_key()), kind, district, label)
            )
            # made up, sealed like a real one: the console shows it beside the alert
            address = f"demo street {n + 1}, {district}-gu, Seoul"
            lat, lon = DEMO_PLACES[district]
            addresses.append(
                (
                    device_id,
                    {
                        "address": address,
                        "floor": str(n % 9 + 1),
                        "location": {"lat": lat + n * 0.003, "lon": lon},
                        "phones": [{"role": "victim", "number": f"+8210000{n + 1:05d}"}],
                    },
                )
            )
            config = DeviceConfig(
                device=DeviceSection(id=device_id, kind=kind, state_dir=state / device_id),
                gateway=GatewaySection(
                    id="gw-demo", public_key=public_key_to_b64(gateway_signer.public_key)
                ),
                mqtt=MqttSection(port=mqtt_port, version=version, heartbeat_s=DEMO_HEARTBEAT_S),
                behaviour=BehaviourSection(**DEMO_HOLDS),
                video=DeviceVideo(loopback_candidates=True),
            )
            # doorbells get a moving test picture: an emergency press starts their video
            camera = SyntheticCamera(320, 240, 15) if kind == "doorbell" else None
            inputs, indicator = FakeInputs(), FakeIndicator()
            agent = Agent(
                config,
                signer=Signer(device_id, key),
                gateway_key=gateway_signer.public_key,
                hardware=Hardware(inputs, indicator, camera, None),
            )
            bells.append(DemoBell(agent, kind, inputs, indicator))
        agents = [bell.agent for bell in bells]

        env = {"ANSIMI_CENTRE_SECRET": secret, "ANSIMI_CONSOLE_GATEWAY_TOKEN": api_token}
        centre_db = state / "centre.db"
        add_operator(centre_db, "demo", operator_password, state / "console.log")
        console = spawn(
            [
                "console",
                "--listen",
                f"127.0.0.1:{console_port}",
                "--db",
                str(centre_db),
                "--gateway",
                f"http://127.0.0.1:{api_port}",
                "--gateway-key",
                f"gw-demo={public_key_to_b64(gateway_signer.public_key)}",
                "--sync-every",
                "5",
            ],
            state / "console.log",
            env,
        )
        gateway = spawn(
            ["-v", "gateway", "run", "--config", str(config_path)], state / "gateway.log", env
        )
        steps: list[asyncio.Task[int]] = []
        pressed = 0
        try:
            await _console_up(console, console_port, state / "console.log")
            # presses before the gateway subscribes would wait out a device resend delay
            await _gateway_ready(api_port, 60)
            admin = AdminClient(f"http://127.0.0.1:{api_port}", admin_token)
            try:
                for registration in registrations:
                    await asyncio.to_thread(admin.register_device, *registration)
                for device_id, private in addresses:
                    await asyncio.to_thread(admin.set_private, device_id, private)
            except ProvisioningError as exc:
                click.echo(f"[demo] cannot register the bells: {exc}; see {state}/gateway.log")
                return 1
            # the bells start once the gateway knows them: it refuses unknown devices
            for bell in bells:
                bell.task = asyncio.create_task(bell.agent.run(), name=bell.agent.device_id)
            await asyncio.gather(*(asyncio.wait_for(a.ready.wait(), 20) for a in agents))
            # another program that took the port after the check answers there too: the
            # console itself must still be running for the address below to be its own
            _console_alive(console, console_port, state / "console.log")
            click.echo(
                f"[demo] console: open http://127.0.0.1:{console_port}/ and sign in as "
                f"demo / {operator_password}"
            )
            click.echo(
                "[demo] acknowledge an alert there and watch its bell here; a doorbell's "
                "alert has a button for its live camera"
            )
            tour = plan_tour(bells)
            click.echo(
                f"[demo] {devices} bells connected; a tour of {len(tour)} kinds, then a press "
                f"every {press_every_s:g}s (holds shortened: {_holds()})"
            )
            deadline = time.monotonic() + duration_s if duration_s > 0 else float("inf")
            shown: dict[str, int] = {a.device_id: 0 for a in agents}
            next_press = time.monotonic() + 1.0
            after_tour = pressed_after_tour(bells, tour)
            presses = itertools.cycle(after_tour)
            while True:
                while time.monotonic() < min(next_press, deadline):
                    _print_indicators(bells, shown)
                    await asyncio.sleep(0.1)
                if time.monotonic() >= deadline:
                    break
                next_press = time.monotonic() + press_every_s
                if tour:
                    step, bell = tour.pop(0)
                    click.echo(f"[{bell.agent.device_id}] {step.says}")
                    # a hold takes seconds: the bells' lights are printed meanwhile
                    steps.append(asyncio.create_task(step.act(bell)))
                    continue
                # the next bell still running (the tour stopped one)
                pressing = next(
                    (b for b in itertools.islice(presses, len(after_tour)) if b.task is not None),
                    None,
                )
                if pressing is not None:
                    pressed += await _press(pressing)
                    click.echo(f"[{pressing.agent.device_id}] button pressed")
            pressed += sum(await asyncio.gather(*steps))
            # Let the last alerts land before counting.
            settle = time.monotonic() + 20
            while time.monotonic() < settle and _count(centre_db) < pressed:
                _print_indicators(bells, shown)
                await asyncio.sleep(0.1)
            _print_indicators(bells, shown)
        finally:
            tasks = [*steps, *(b.task for b in bells if b.task is not None)]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for process in (gateway, console):
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(5)
        arrived = _count(centre_db)
        click.echo(f"[demo] {pressed} presses, {arrived} alerts at the control centre")
        by_kind = ", ".join(f"{kind} {n}" for kind, n in _kinds(centre_db).items())
        click.echo(f"[demo] incidents at the control centre by kind: {by_kind or 'none'}")
        if pressed and arrived < pressed:
            click.echo(f"[demo] some alerts did not arrive: see {state}/gateway.log", err=True)
            return 1
        return 0


CONSOLE_PORT_FIX = "choose another with --port N, or a free one with --port 0 (make demo PORT=0)"


async def _console_up(console: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
    """Until the console answers on `port`; DemoError naming its own error if it stopped."""
    async with asyncio.timeout(20):
        while True:
            _console_alive(console, port, log_file)
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            await asyncio.sleep(0.1)


def _console_alive(console: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
    if console.poll() is None:
        return
    try:  # another program took the port after usable_port() found it free
        check_free("the demo's console", "127.0.0.1", port, CONSOLE_PORT_FIX)
    except PortTaken as exc:
        raise DemoError(str(exc)) from None
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    cause = lines[-1].removeprefix("Error: ") if lines else f"exit code {console.returncode}"
    raise DemoError(f"the console stopped: {cause} (its log: {log_file})")


async def _gateway_ready(api_port: int, timeout_s: float) -> None:
    """Until the gateway's /healthz says it is connected to the broker (it subscribes at
    once after), bounded; a slow machine (aiortc loads with video on) gets its time."""
    import aiohttp

    url = f"http://127.0.0.1:{api_port}/healthz"
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as response:
                    if response.status == 200:
                        await asyncio.sleep(0.2)  # its subscribe follows the connect
                        return
            await asyncio.sleep(0.1)
    click.echo(f"[demo] the gateway is not ready after {timeout_s:g}s: pressing anyway", err=True)


def _print_indicators(bells: list[DemoBell], shown: dict[str, int]) -> None:
    for bell in bells:
        device_id = bell.agent.device_id
        history = bell.indicator.history
        for pattern, silent in history[shown[device_id] :]:
            quiet = " (silent: nothing visible)" if silent else ""
            click.echo(f"[{device_id}] bell shows: {pattern}{quiet}")
        shown[device_id] = len(history)


def _count(centre_db: Path) -> int:
    """Press alerts the centre has kept (status and power news are not presses)."""
    try:
        with contextlib.closing(sqlite3.connect(centre_db)) as db:
            query = (
                "SELECT COUNT(*) FROM events WHERE type = 'alert'"
                " AND json_extract(body, '$.trigger') = 'press'"
            )
            return int(db.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def _kinds(centre_db: Path) -> dict[str, int]:
    """Incidents by their kind now (the gateway's word on each delivery; an upgraded one
    counts as its worst), and test presses as `test`."""
    try:
        with contextlib.closing(sqlite3.connect(centre_db)) as db:
            rows = db.execute(
                "SELECT incident_id, kind, priority FROM events WHERE incident_id != ''"
            ).fetchall()
            tests = db.execute(
                "SELECT COUNT(*) FROM events WHERE type = 'alert'"
                " AND json_extract(body, '$.trigger') = 'test'"
            ).fetchone()[0]
    except sqlite3.Error:
        return {}
    worst: dict[str, tuple[int, str]] = {}
    for incident_id, kind, priority in rows:
        if incident_id not in worst or priority < worst[incident_id][0]:
            worst[incident_id] = (priority, kind)
    counted: dict[str, int] = {}
    for _, kind in worst.values():
        counted[kind] = counted.get(kind, 0) + 1
    if tests:
        counted["test"] = int(tests)
    return counted


def _holds() -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:g}s" for k, v in DEMO_HOLDS.items())


def usable_port(port: int) -> int:
    """The console's port: `port` if nothing listens there, a free one for 0. A taken
    port stops the demo before it starts anything, saying what to do."""
    if port == 0:
        return free_port()
    try:
        check_free("the demo's console", "127.0.0.1", port, CONSOLE_PORT_FIX)
    except PortTaken as exc:
        raise click.ClickException(str(exc)) from None
    return port


@click.command()
@click.option(
    "--devices",
    default=9,
    show_default=True,
    help="simulated bells (9: every kind of the tour on a bell of its own)",
)
@click.option("--duration", default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
@click.option("--press-every", default=3.0, show_default=True, help="seconds between presses")
@click.option(
    "--port",
    "--console-port",
    "console_port",
    default=8080,
    show_default=True,
    help="the console's port on 127.0.0.1; 0: a free one",
)
@click.option(
    "--broker",
    "broker_kind",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="auto: mosquitto where installed, else the embedded amqtt",
)
@click.option(
    "--state-dir", type=click.Path(path_type=Path), default=Path("demo-state"), show_default=True
)
def demo(
    devices: int,
    duration: float,
    press_every: float,
    console_port: int,
    broker_kind: str,
    state_dir: Path,
) -> None:
    """Broker, gateway, control-centre console and simulated bells on this machine."""
    # SIGTERM as Ctrl-C: the demo then stops the gateway and console processes it started
    # instead of leaving them running
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    console_port = usable_port(console_port)  # before anything starts: fail fast
    try:
        code = asyncio.run(
            run_demo(state_dir.resolve(), devices, duration, console_port, press_every, broker_kind)
        )
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
