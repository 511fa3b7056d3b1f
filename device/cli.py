"""`ansimi device ...`: run the agent, or check the hardware and the network around it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ansimi.config import ConfigError, load_config
from ansimi.lazygroup import LazyGroup
from device.config import DeviceConfig
from protocol.messages import ACK_STAGES

if TYPE_CHECKING:
    from device.agent import Agent
    from device.hal.ports import Camera, Modem
    from device.outbox import OutboxError
    from device.update import Fetch, Updater
    from protocol.jws import Signer

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/ansimi/device.toml")
ENROL_HINT = "run `ansimi device enrol`"
# A clock before this is plainly unset: the gateway keeps such a bell's messages but flags
# every one, until its sync corrects the agent's offset (protocol.replay).
SANE_YEAR = 2025
CHECK_TIMEOUT_S = 10.0

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="device TOML file",
)


@click.group(
    cls=LazyGroup,
    # enrolment needs X.509 and HTTP: ~1.5 MB a running agent would otherwise carry
    lazy={"enrol": ("device.enrol:enrol_command", "enrol this device with the site")},
    # the command's first spelling: scripts, labels and older installers' ssh still use it
    aliases={"enroll": "enrol"},
)
def device() -> None:
    """Run, enrol and test a device agent."""


def _load(config_path: Path) -> DeviceConfig:
    try:
        return load_config(config_path, DeviceConfig)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _gateway_key(config: DeviceConfig, config_path: Path) -> Ed25519PublicKey:
    from protocol.errors import Malformed
    from protocol.keys import public_key_from_b64

    try:
        return public_key_from_b64(config.gateway.public_key)
    except Malformed as exc:
        raise click.ClickException(
            f"{config_path}: key `gateway.public_key`: {exc}. Fix: set it to the gateway's "
            f"public key from enrolment ({ENROL_HINT})"
        ) from None


@device.command()
@config_option
def run(config_path: Path) -> None:
    """Run the agent until stopped (SIGTERM or Ctrl-C)."""
    from device.private import DevicePrivacyError, with_sms_numbers
    from protocol.errors import ProtocolError
    from protocol.jws import Signer
    from protocol.keys import load_private_key

    try:
        # the sealed SMS numbers are opened in memory only, never written back in clear
        config = with_sms_numbers(_load(config_path))
    except DevicePrivacyError as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    try:
        key = load_private_key(config.device.key_file, hint=ENROL_HINT)
    except (ProtocolError, PermissionError) as exc:
        raise click.ClickException(str(exc)) from None
    signer = Signer(config.device.id, key)
    gateway_key = _gateway_key(config, config_path)
    updater = _updater(config, config_path)
    from device.update import RESTART_EXIT_CODE, RestartRequested

    try:
        asyncio.run(_run(config, signer, gateway_key, updater, device_key=key))
    except* RestartRequested as group:
        log.warning("device %s: %s", config.device.id, group.exceptions[0])
        sys.exit(RESTART_EXIT_CODE)  # systemd starts the launcher again (Restart=always)


def _updater(config: DeviceConfig, config_path: Path) -> Updater | None:
    """The update root this device was installed with, or None: it takes no updates."""
    from device.update import Updater, pip_install
    from protocol.clock import wall_ms
    from protocol.errors import Malformed
    from protocol.keys import public_key_from_b64

    section = config.update
    if section.root is None:
        return None
    try:
        release_key = public_key_from_b64(section.release_public_key)
    except Malformed as exc:
        raise click.ClickException(
            f"{config_path}: key `update.release_public_key`: {exc}. Fix: set it to the "
            "site's release public key (`ansimi provision release key init` prints it)"
        ) from None
    return Updater(
        section.root,
        release_key,
        fetch=_fetch_with_site_ca(config),
        install=pip_install,
        clock_ms=wall_ms,
        trial_s=section.trial_s,
        max_trial_boots=section.max_trial_boots,
    )


def _fetch_with_site_ca(config: DeviceConfig) -> Fetch:
    """Bundles come from the gateway's HTTPS API, whose certificate the site CA signs."""
    import ssl

    import aiohttp

    from device.update import http_fetch

    async def fetch(url: str, path: Path) -> None:
        context = ssl.create_default_context(
            cafile=str(config.mqtt.ca_file) if config.mqtt.ca_file else None
        )
        connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(connector=connector) as session:
            await http_fetch(session)(url, path)

    return fetch


@device.command()
@config_option
def launch(config_path: Path) -> None:
    """systemd's entry point: settle an update's trial, then run the version `current` names."""
    import os

    from device.update import launch_environment

    config = _load(config_path)
    updater = _updater(config, config_path)
    # -P: the working folder never comes before the version's code on the path
    command = [sys.executable, "-P", "-m", "ansimi_edge", "device", "run"]
    command += ["--config", str(config_path)]
    if updater is None:
        os.execv(sys.executable, command)  # noqa: S606 (a fixed argv of our own)
    current = updater.boot()
    # the same process (systemd's main PID, for READY=1 and the watchdog), the new code
    environment = launch_environment(current, dict(os.environ))
    os.execve(sys.executable, command, environment)  # noqa: S606 (a fixed argv of our own)


def outbox_fix(exc: OutboxError) -> str:
    """What to do about an outbox that cannot be opened, said from what actually failed."""
    from device import outbox  # late, like the rest of the agent

    if isinstance(exc, outbox.OutboxFull):
        return (
            "free space on the disk that holds `device.state_dir` (df -h); systemd starts "
            "the agent again, and it opens or creates its outbox once there is room"
        )
    if isinstance(exc, outbox.OutboxDamaged):
        return (
            "let the service user write `device.state_dir` so the damaged file can be "
            "moved aside, or move it aside by hand; the agent then starts a fresh outbox"
        )
    if isinstance(exc, outbox.OutboxStorageFailed):
        return "the storage under `device.state_dir` fails to read or write: check it (dmesg)"
    if isinstance(exc, outbox.OutboxBusy):
        return (
            "another agent is running with this state_dir (stop it: systemctl stop "
            "ansimi-device), or give each agent its own `device.state_dir`"
        )
    return "make `device.state_dir` a folder the service user can write (StateDirectory=)"


async def _run(
    config: DeviceConfig,
    signer: Signer,
    gateway_key: Ed25519PublicKey,
    updater: Updater | None = None,
    *,
    device_key: Ed25519PrivateKey | None = None,
) -> None:
    from device.agent import Agent
    from device.control import ControlServer, socket_path
    from device.hal import HalError, build_hardware
    from device.outbox import Outbox, OutboxError

    loop = asyncio.get_running_loop()
    try:
        hardware = build_hardware(config.hardware, loop)
    except HalError as exc:
        raise click.ClickException(f"hardware: {exc}") from None
    try:
        outbox = Outbox(config.device.state_dir / "outbox.db")
    except OutboxError as exc:
        await hardware.aclose()
        raise click.ClickException(
            f"cannot open the outbox in {config.device.state_dir}: {exc}. Fix: {outbox_fix(exc)}"
        ) from None
    agent = Agent(
        config,
        signer=signer,
        gateway_key=gateway_key,
        hardware=hardware,
        outbox=outbox,
        updater=updater,
        device_key=device_key,
    )
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    _desk_controls(agent, loop)
    log.info("device %s: agent starting (%s)", config.device.id, config.device.kind)
    control = ControlServer(agent, agent.on_input, socket_path(config.device.state_dir))
    with contextlib.suppress(asyncio.CancelledError):
        async with control:
            await agent.run()


def _desk_controls(agent: Agent, loop: asyncio.AbstractEventLoop) -> None:
    """With fake hardware (desk demos, tests), SIGUSR1 is a short press of the emergency
    button: the fallback to `ansimi device press` (the control socket)."""
    from device.hal.fakes import FakeInputs

    inputs = agent.hardware.inputs
    if not isinstance(inputs, FakeInputs):
        return

    def press() -> None:
        inputs.press("emergency")
        inputs.release("emergency")

    loop.add_signal_handler(signal.SIGUSR1, press)


# ---- the installer's test press and status (device/control.py) -------------------------

STAGE_RANK: dict[str, int] = {stage: rank for rank, stage in enumerate(ACK_STAGES)}


@device.command()
@config_option
@click.option("--long", "gesture", flag_value="long", help="held to long_press_s: urgent")
@click.option("--duress", "gesture", flag_value="duress", help="held to duress_hold_s")
@click.option("--ring", "gesture", flag_value="ring", help="the doorbell button")
@click.option("--cancel", "gesture", flag_value="cancel", help="held to cancel_hold_s")
@click.option("--tamper", "gesture", flag_value="tamper", help="tamper switch opened, closed")
@click.option(
    "--until",
    type=click.Choice(["received", "delivered", "acknowledged", "dispatched"]),
    default="acknowledged",
    show_default=True,
    help="the stage each alert of the press must reach",
)
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True)
def press(config_path: Path, gesture: str | None, until: str, timeout_s: float) -> None:
    """Press a button of the running agent and print each stage as it comes back.

    The press goes in as the button's own input events, so it means exactly what a finger
    would. Exit 0 once every alert reached --until, 1 if it did not in time.
    """
    from device.control import ControlUnavailable, request, socket_path

    config = _load(config_path)
    path = socket_path(config.device.state_dir)
    waiting: dict[str, str] = {}  # message id -> the stage it must reach
    reached: dict[str, str] = {}  # message id -> the last stage it reached
    started: list[int] = []

    def on_line(line: dict[str, Any]) -> bool:
        event = line.get("event")
        if event == "error":
            raise click.ClickException(f"the agent refused the press: {line.get('reason')}")
        if event == "done":
            click.echo(str(line.get("detail")))
            return False
        t_ms = int(line.get("t_ms", 0))
        started[:] = started or [t_ms]
        elapsed = f"+{(t_ms - started[0]) / 1000:.2f}s".rjust(8)
        message_id = str(line.get("id"))
        if event == "sent":
            kind = line.get("type")
            what = f"{kind} {line.get('trigger')}" if kind == "alert" else kind
            urgent = " (urgent)" if line.get("urgent") else ""
            click.echo(f"{_clock(t_ms)} {elapsed}  sent          {what}{urgent} {message_id}")
            # only alerts go on to a centre and an operator; the rest end at the gateway
            waiting[message_id] = until if kind == "alert" else "received"
        elif event == "stage":
            stage = str(line.get("stage"))
            click.echo(f"{_clock(t_ms)} {elapsed}  {stage:<13} {message_id}")
            reached[message_id] = stage
            wanted = waiting.get(message_id)
            if wanted is not None and STAGE_RANK.get(stage, -1) >= STAGE_RANK[wanted]:
                del waiting[message_id]
        return bool(waiting)

    async def go() -> None:
        async with asyncio.timeout(timeout_s):
            await request(path, {"op": "press", "gesture": gesture or "short"}, on_line)

    try:
        asyncio.run(go())
    except ControlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except TimeoutError:
        stages = [reached.get(m, "sent") for m in waiting] or ["sent"]
        stuck = min(stages, key=lambda stage: STAGE_RANK.get(stage, -1))
        raise click.ClickException(
            f"not every alert reached `{until}` within {timeout_s:g} s: "
            + _STUCK_AT.get(stuck, f"it stopped at `{stuck}`")
        ) from None
    if waiting:
        raise click.ClickException("the agent closed the connection before every stage came")


# where a press that did not reach --until stopped, and where to look
_STUCK_AT: Final = {
    "sent": "no ack from the gateway: see `ansimi device status` (link, outbox) and the "
    "gateway's log",
    "received": "the gateway has it, but no control centre took it: check the gateway's "
    "[[centres]] (`ansimi provision doctor` on the gateway says which one does not answer)",
    "delivered": "a control centre has it; no operator acknowledged it yet: acknowledge it "
    "at the console, or test without an operator with --until delivered",
    "acknowledged": "an operator acknowledged it; no dispatch was reported yet",
}


def _clock(t_ms: int) -> str:
    return dt.datetime.fromtimestamp(t_ms / 1000, dt.UTC).strftime("%H:%M:%S.%f")[:-3]


@device.command()
@config_option
def status(config_path: Path) -> None:
    """What the running agent knows: link, last ack, outbox, power, firmware, SMS path."""
    from device.control import ControlUnavailable, request, socket_path

    config = _load(config_path)
    answer: dict[str, Any] = {}

    def on_line(line: dict[str, Any]) -> bool:
        answer.update(line)
        return False

    try:
        asyncio.run(request(socket_path(config.device.state_dir), {"op": "status"}, on_line))
    except ControlUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    if answer.get("event") != "status":
        raise click.ClickException(f"the agent answered: {answer.get('reason', answer)}")
    last = answer["last_ack"]
    sms = answer["sms"]
    rows = {
        "device": f"{answer['device']} ({answer['kind']})",
        "link": answer["link"],
        "last ack": "none since start"
        if last is None
        else f"{last['stage']} {last['id']} at {_clock(last['t_ms'])} UTC",
        "outbox": f"{answer['outbox_depth']} waiting for the gateway",
        "power": answer["power"],
        "firmware": answer["firmware"],
        "SMS path": "not probed yet (first heartbeat)" if sms is None else _sms_text(sms),
        "incident": answer["incident"] or "none",
    }
    for name, value in rows.items():
        click.echo(f"{name:<10} {value}")


def _sms_text(sms: dict[str, Any]) -> str:
    if not sms["modem"]:
        return "no modem"
    signal_text = "unknown" if sms["signal"] is None else f"{sms['signal']}%"
    return (
        f"modem ok, SIM {sms['sim']}, registered {sms['registered']}, signal {signal_text}, "
        f"{sms['numbers']} number(s)"
    )


# ---- selftest ---------------------------------------------------------------------------

Outcome = Literal["pass", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


@device.command()
@config_option
def selftest(config_path: Path) -> None:
    """Check LED, buzzer, buttons, camera, modem, broker and clock; exit 1 if any fails."""
    from rich.console import Console
    from rich.table import Table

    config = _load(config_path)
    checks = asyncio.run(run_selftest(config, config_path))
    table = Table(title=f"ansimi device selftest: {config.device.id}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    style = {"pass": "[green]PASS[/]", "fail": "[red]FAIL[/]", "skip": "[yellow]SKIP[/]"}
    for check in checks:
        table.add_row(check.name, style[check.outcome], check.detail)
    Console(width=120).print(table)
    if any(c.outcome == "fail" for c in checks):
        raise SystemExit(1)


async def _checked(name: str, probe: Callable[[], Awaitable[tuple[Outcome, str]]]) -> Check:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            outcome, detail = await probe()
    except TimeoutError:
        return Check(name, "fail", f"no answer within {CHECK_TIMEOUT_S:g} s")
    except Exception as exc:
        return Check(name, "fail", f"{type(exc).__name__}: {exc}")
    return Check(name, outcome, detail)


async def run_selftest(config: DeviceConfig, config_path: Path) -> list[Check]:
    from device.hal import HalError, build_hardware
    from device.hal.ports import Pattern

    checks: list[Check] = [await _checked("keys", lambda: _check_keys(config, config_path))]
    hw = config.hardware
    try:
        hardware = build_hardware(hw, asyncio.get_running_loop())
    except HalError as exc:
        # one wrong pin stops every other hardware check: say which, and still check the rest
        checks.append(Check("hardware", "fail", str(exc)))
        hardware = None
    if hardware is not None:
        led = hw.led_pin is not None or hw.has_rgb_led or hw.driver == "fake"

        async def indicator() -> tuple[Outcome, str]:
            # audible on purpose: the installer is checking that it lights and beeps
            hardware.indicator.show(Pattern.SELFTEST, silent=False)
            return "pass", "selftest pattern shown: look and listen"

        checks.append(
            await _checked("led", indicator)
            if led
            else Check("led", "skip", "no led_pin or RGB pins configured")
        )
        checks.append(
            Check(
                "buzzer",
                "pass",
                "fake buzzer" if hw.buzzer_pin is None else f"GPIO{hw.buzzer_pin} set up",
            )
            if hw.buzzer_pin is not None or hw.driver == "fake"
            else Check("buzzer", "skip", "no buzzer_pin configured")
        )
        checks.append(_check_buttons(config))
        checks.append(await _checked("camera", lambda: _check_camera(hardware.camera)))
        checks.append(await _checked("modem", lambda: _check_modem(hardware.modem, config)))
        await hardware.aclose()
    checks.append(await _checked("broker", lambda: _check_broker(config)))
    checks.append(await _checked("clock", _check_clock))
    return checks


async def _check_keys(config: DeviceConfig, config_path: Path) -> tuple[Outcome, str]:
    from protocol.keys import load_private_key

    load_private_key(config.device.key_file, hint=ENROL_HINT)
    try:
        _gateway_key(config, config_path)
    except click.ClickException as exc:
        return "fail", exc.message
    # the data key and the outbox are made on first use: absent is fine, readable by others
    # is not (the outbox holds pending alerts)
    outbox = config.device.state_dir / "outbox.db"
    for secret in (config.device.key_file, config.device.data_key_file, outbox):
        if secret.exists() and (mode := stat.S_IMODE(secret.stat().st_mode)) & 0o077:
            return "fail", f"{secret} is {mode:04o}, readable by others: chmod 600 {secret}"
    return "pass", f"device key {config.device.key_file} and gateway key readable"


def _check_buttons(config: DeviceConfig) -> Check:
    hw = config.hardware
    kind = config.device.kind
    if hw.emergency_pin is None and not (kind == "doorbell" and hw.doorbell_pin is not None):
        return Check("buttons", "fail", "no emergency_pin: nothing can raise an alert")
    if kind == "doorbell" and hw.doorbell_pin is None:
        return Check("buttons", "fail", "a doorbell needs doorbell_pin")
    pins = [f"{k}=GPIO{getattr(hw, k)}" for k in ("emergency_pin", "doorbell_pin", "tamper_pin")]
    wired = [p for p in pins if not p.endswith("None")]
    return Check(
        "buttons", "pass", ", ".join(wired) + f"; long press {config.behaviour.long_press_s:g} s"
    )


async def _check_camera(camera: Camera | None) -> tuple[Outcome, str]:
    if camera is None:
        return "skip", "camera = none"
    camera.start()
    try:
        frame = await camera.capture()
    finally:
        camera.stop()
    return "pass", f"{camera.name}: one {frame.width}x{frame.height} frame"


# the modem works, but nobody would get an SMS: said beside the pass, with the fix
NO_NUMBERS_HINT = "; no SMS numbers configured: set them with `ansimi device set-sms-numbers`"


async def _check_modem(modem: Modem | None, config: DeviceConfig) -> tuple[Outcome, str]:
    if modem is None:
        wanted = config.sms.numbers or config.sms.numbers_sealed
        sms = " (the SMS fallback needs one)" if wanted else ""
        return "skip", f"no modem_port{sms}"
    info = await modem.probe()
    signal_text = "unknown" if info.signal is None else f"{info.signal}/31"
    if not info.ok:
        return "fail", f"{info.model} answers but cannot send SMS (SIM {info.sim})"
    if info.registered is False:
        return "fail", f"{info.model}: SIM ready but not registered on a network (AT+CREG?)"
    numbers = "" if config.sms.numbers or config.sms.numbers_sealed else NO_NUMBERS_HINT
    return "pass", f"{info.model}, signal {signal_text}{numbers}"


async def _check_broker(config: DeviceConfig) -> tuple[Outcome, str]:
    from ansimi.mqtt import Session, Settings, TlsFiles

    m = config.mqtt
    try:
        # a plain TCP connect first: says "refused" or "unreachable" at once, with the reason
        _, writer = await asyncio.wait_for(asyncio.open_connection(m.host, m.port), 5)
    except (OSError, TimeoutError) as exc:
        return "fail", f"cannot reach {m.host}:{m.port}: {exc or 'timed out'}"
    writer.close()
    tls = TlsFiles(m.ca_file, m.cert_file, m.key_file) if m.ca_file is not None else None
    # Not the device's own client id: that would throw a running agent off the broker.
    session = Session(
        Settings(
            host=m.host,
            port=m.port,
            client_id=f"{config.device.id}-selftest",
            version=m.version,
            persistent=False,
            tls=tls,
            backoff_max_s=1.0,
        ),
        lambda _message: None,
    )
    task = asyncio.create_task(session.run())
    try:
        await session.wait_connected(CHECK_TIMEOUT_S - 1)
    except TimeoutError:
        return "fail", f"cannot connect to {m.host}:{m.port} (see the log for why)"
    finally:
        await session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return "pass", f"connected to {m.host}:{m.port}" + (" with TLS" if tls else "")


async def _check_clock() -> tuple[Outcome, str]:
    now = dt.datetime.now(dt.UTC)
    if now.year < SANE_YEAR:
        return "fail", f"clock says {now:%Y-%m-%d}: set the time (NTP): the gateway flags it"
    synced = await asyncio.to_thread(_ntp_synchronized)
    if synced is False:
        return "fail", f"{now:%Y-%m-%d %H:%M} UTC, but NTP is not synchronised (timedatectl)"
    note = "NTP synchronised" if synced else "NTP state unknown"
    return "pass", f"{now:%Y-%m-%d %H:%M} UTC, {note}"


def _ntp_synchronized() -> bool | None:
    """What systemd-timesyncd says, or None where it cannot tell (no systemd, a container)."""
    timedatectl = shutil.which("timedatectl")
    if timedatectl is None:
        return None
    try:
        result = subprocess.run(
            [timedatectl, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = result.stdout.strip()
    return {"yes": True, "no": False}.get(value) if result.returncode == 0 else None


@device.command("set-sms-numbers")
@config_option
def set_sms_numbers_command(config_path: Path) -> None:
    """Seal the SMS fallback numbers into the config: read one a line from standard input.

    Not taken as arguments: those would stay in the shell's history and show in `ps`.
    An empty input removes them (no SMS fallback).
    """
    from device.private import DevicePrivacyError, set_sms_numbers

    config = _load(config_path)
    stdin = sys.stdin
    if stdin.isatty():
        click.echo("SMS fallback numbers, one a line (+8210...), then Ctrl-D:", err=True)
    try:
        count = set_sms_numbers(config_path, config, stdin.read().splitlines())
    except (DevicePrivacyError, OSError) as exc:
        raise click.ClickException(f"{config_path}: {exc}") from None
    click.echo(
        f"{count} number(s) sealed in {config_path} with {config.device.data_key_file}; "
        "restart the agent to use them"
    )


@device.command()
@config_option
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def wipe(config_path: Path, yes: bool) -> None:
    """Remove this device's keys, config and outbox (before it leaves the home)."""
    from device.private import wipe as wipe_device
    from device.private import wipe_targets

    config = _load(config_path)
    targets = wipe_targets(config_path, config)
    if not yes:
        click.echo("This removes, for good:")
        for path in targets:
            click.echo(f"  {path}")
        click.confirm("Wipe this device?", abort=True)
    wiped = wipe_device(config_path, config)
    for path in wiped.removed:
        click.echo(f"removed {path}")
    click.echo(f"wiped: {len(wiped.removed)} file(s) removed, {len(wiped.absent)} already absent")
