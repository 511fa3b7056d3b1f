"""Bells that update themselves, as a Pi does under systemd: for rollout tests, benches and
the simulator's `[rollout]` scenarios.

Each simulated bell has an update root of its own (device/update.py) and runs the real
agent with the real `Updater`; `launch` is the launcher's part before each start, and
`under_systemd` plays systemd and the launcher (boot, start, start again after exit 75;
the simulator's worker does the same for its agents). Releases are tiny real wheels of one
package, `ansimi_probe`, whose module says its version, and, for a release meant to fail,
that its self-test fails: the bell then gets a modem whose SIM is not ready, so the
agent's own self-test fails. The simulated bells run in one process (the agent's code
cannot change under it), so "install" unpacks the pure-Python wheels as `pip install
--target` would, without pip's start-up.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ansimi.bundle import build_bundle
from device.agent import Agent
from device.config import DeviceConfig, DeviceSection, GatewaySection, MqttSection
from device.hal import Hardware
from device.hal.fakes import FakeIndicator, FakeInputs, FakeModem
from device.update import RestartRequested, Updater, http_fetch
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import public_key_to_b64

PROBE = "ansimi_probe"
SELFTEST_FAILS = "SELFTEST_FAILS = True"


def probe_wheel(folder: Path, version: str, *, extra: str = "") -> Path:
    """A pure-Python wheel of `ansimi_probe` at `version`; `extra` is more module code."""
    dist = f"{PROBE}-{version}.dist-info"
    files = {
        f"{PROBE}/__init__.py": f'VERSION = "{version}"\n{extra}',
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: ansimi-simulator\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{PROBE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def probe_bundle(
    folder: Path,
    signer: Signer,
    version: str,
    *,
    min_version: str = "0.1",
    extra: str = "",
    selftest_fails: bool = False,
) -> Path:
    """A signed release bundle of `ansimi_probe` at `version`."""
    wheels = folder / f"wheels-{version}"
    wheels.mkdir(parents=True, exist_ok=True)
    out = folder / f"ansimi-{version}.bundle"
    code = f"{extra}\n{SELFTEST_FAILS}\n" if selftest_fails else extra
    build_bundle(
        [probe_wheel(wheels, version, extra=code)],
        version=version,
        min_version=min_version,
        signer=signer,
        out=out,
        now_ms=1_700_000_000_000,
    )
    return out


def install_factory(root: Path, version: str) -> None:
    """What the installer leaves on a device: one version, and `current` naming it."""
    site = root / "versions" / version / "site" / PROBE
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(f'VERSION = "{version}"\n')
    (root / "current").symlink_to(f"versions/{version}")


def _probe_code(root: Path) -> str:
    return (root / "current" / "site" / PROBE / "__init__.py").read_text()


def running_version(root: Path) -> str:
    """The version the launcher would start: read from the folder `current` names."""
    return _probe_code(root).split('"')[1]


def selftest_passes(root: Path) -> bool:
    """Whether the version `current` names passes the agent's self-test (a broken release's
    bell gets a modem whose SIM is not ready)."""
    return SELFTEST_FAILS not in _probe_code(root)


async def unzip_install(wheels: Sequence[Path], target: Path) -> None:
    """What `pip install --target` does with a pure wheel, without pip's second of start-up."""
    target.mkdir()
    for wheel in wheels:
        shutil.unpack_archive(wheel, target, "zip")


async def fetch_over_http(url: str, path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        await http_fetch(session, timeout_s=60)(url, path)


def launch(root: Path, release_key: Ed25519PublicKey, *, trial_s: float) -> Updater:
    """What the launcher does before each start of the agent (`ansimi device launch`):
    settle the journal (count a trial's starts, switch back past its limits); then the
    updater the agent is given, downloading over HTTP and installing without pip."""
    updater = Updater(
        root,
        release_key,
        fetch=fetch_over_http,
        install=unzip_install,
        clock_ms=wall_ms,
        trial_s=trial_s,
        running=lambda: running_version(root),  # what the launcher started
    )
    updater.boot()
    return updater


@dataclass
class UpdatingBell:
    signer: Signer
    root: Path  # the update root
    state: Path  # the agent's state folder
    starts: int = 0
    agent: Agent | None = None  # the agent running now

    @classmethod
    def at(cls, folder: Path, signer: Signer, version: str) -> UpdatingBell:
        """A bell installed at `version` in `folder`."""
        bell = cls(signer, folder / "opt", folder / "state")
        bell.root.mkdir(parents=True)
        install_factory(bell.root, version)
        return bell


async def under_systemd(
    bell: UpdatingBell,
    *,
    broker: tuple[str, int],
    gateway: Signer,
    release_key: Ed25519PublicKey,
    trial_s: float = 20.0,
    heartbeat_s: float = 1.0,
    on_start: Callable[[UpdatingBell], None] = lambda _bell: None,
) -> None:
    """The launcher's boot, then the agent; again after each exit for a restart, for good."""
    device_id = bell.signer.kid
    while True:
        updater = launch(bell.root, release_key, trial_s=trial_s)
        config = DeviceConfig(
            device=DeviceSection(id=device_id, kind="bell", state_dir=bell.state),
            gateway=GatewaySection(
                id=gateway.kid, public_key=public_key_to_b64(gateway.public_key)
            ),
            mqtt=MqttSection(host=broker[0], port=broker[1], heartbeat_s=heartbeat_s),
        )
        modem = FakeModem(sim_ready=selftest_passes(bell.root))
        bell.agent = Agent(
            config,
            signer=bell.signer,
            gateway_key=gateway.public_key,
            hardware=Hardware(FakeInputs(), FakeIndicator(), None, modem),
            updater=updater,
        )
        bell.starts += 1
        on_start(bell)
        try:
            await bell.agent.run()
        except* RestartRequested:
            pass  # exit 75: systemd starts the launcher again
