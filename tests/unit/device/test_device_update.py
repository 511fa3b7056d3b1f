"""The update state machine: each step, the launcher's trial rules, and a power cut anywhere.

A power cut is a SIGKILL of a process running the steps (update_child.py), at each durable
point; then the next start (the launcher's `boot`, the agent's `advance`) must find a
complete version to run and finish or undo the update.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from release_kit import (
    Clock,
    factory_and_bundle,
    file_fetch,
    install_factory,
    make_bundle,
    release_signer,
    running_version,
    unzip_install,
)
from update_child import CLOCK_MS

from device.update import UpdateFailed, Updater, http_fetch, launch_environment, pip_install
from protocol.jws import Signer
from protocol.keys import public_key_to_b64

CHILD = Path(__file__).with_name("update_child.py")
FORWARD_POINTS = [
    "downloading",
    "fetch_half",
    "fetched",
    "downloaded",
    "extracted",
    "pip_done",
    "installed",
    "trial",
    "switched",
]


def _updater(root: Path, bundle: Path, signer: Signer, clock: Clock | None = None) -> Updater:
    return Updater(
        root,
        signer.public_key,
        fetch=file_fetch(bundle, lambda _name: None),
        install=unzip_install,
        clock_ms=clock or Clock(CLOCK_MS),
        trial_s=60.0,
        max_trial_boots=3,
    )


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path, Signer]:
    return factory_and_bundle(tmp_path)


async def _switched(updater: Updater) -> None:
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.ready and outcome.failed is None
    updater.switch()


def _leftovers(root: Path) -> list[str]:
    """Anything an unfinished step left behind: partial folders, downloads, temp links."""
    found = [p.name for p in (root / "versions").iterdir() if p.name.startswith(".")]
    found += [p.name for p in root.iterdir() if p.name.startswith(".")]
    return found + (["download"] if (root / "download").exists() else [])


async def test_an_update_installs_beside_the_current_version_and_commits(site) -> None:
    root, bundle, signer = site
    updater = _updater(root, bundle, signer)
    await _switched(updater)
    assert updater.boot() == root / "current"
    assert running_version(root) == "2.0"
    journal = updater.journal()
    assert journal is not None and journal.step == "trial" and journal.boots == 1
    updater.commit(journal)
    assert updater.journal() is None
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["1.0", "2.0"]
    assert _leftovers(root) == []


async def test_a_trial_past_its_deadline_switches_back_at_the_next_start(site) -> None:
    root, bundle, signer = site
    clock = Clock(CLOCK_MS)
    updater = _updater(root, bundle, signer, clock)
    await _switched(updater)
    updater.boot()
    clock.ms += 60_001
    updater.boot()
    assert running_version(root) == "1.0"
    journal = updater.journal()
    assert journal is not None and journal.step == "rolled_back"
    assert "within 60 s" in (journal.reason or "")
    updater.reported(journal)
    assert updater.journal() is None
    assert [p.name for p in (root / "versions").iterdir()] == ["1.0"]


async def test_a_version_that_keeps_failing_to_start_is_switched_back_by_the_launcher(
    site,
) -> None:
    root, bundle, signer = site
    updater = _updater(root, bundle, signer)
    await _switched(updater)
    for _ in range(3):  # crashes before its health check: systemd starts it again
        updater.boot()
        assert running_version(root) == "2.0"
    updater.boot()
    assert running_version(root) == "1.0"
    journal = updater.journal()
    assert journal is not None and journal.step == "rolled_back"
    assert "3 starts" in (journal.reason or "")


@pytest.mark.parametrize(
    ("key", "min_version", "reason"),
    [("other", "1.0", "bad_signature"), ("release", "1.5", "too_old")],
)
async def test_a_bundle_refused_after_download_leaves_the_device_as_it_was(
    tmp_path: Path, key: str, min_version: str, reason: str
) -> None:
    signer = release_signer()
    bundle = make_bundle(tmp_path, signer, "2.0", min_version=min_version)
    root = tmp_path / "opt"
    root.mkdir()
    install_factory(root, "1.0")
    updater = _updater(root, bundle, signer if key == "release" else release_signer())
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.failed is not None and outcome.failed.reason == reason
    assert not outcome.ready
    assert updater.journal() is None
    assert running_version(root) == "1.0"
    assert [p.name for p in (root / "versions").iterdir()] == ["1.0"]
    assert _leftovers(root) == []


async def test_a_full_disk_during_install_drops_the_update_instead_of_stopping_the_agent(
    site,
) -> None:
    root, bundle, signer = site

    async def disk_full(wheels: object, target: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    updater = Updater(
        root,
        signer.public_key,
        fetch=file_fetch(bundle, lambda _name: None),
        install=disk_full,
        clock_ms=Clock(CLOCK_MS),
    )
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.failed is not None and outcome.failed.reason == "storage_failed"
    # forgotten and cleaned up (the space freed): the next start runs 1.0 as before
    assert updater.journal() is None and _leftovers(root) == []
    assert running_version(root) == "1.0"


async def test_a_download_cut_by_a_full_disk_is_deleted_not_kept_for_a_resume(site) -> None:
    root, _, signer = site

    async def fills_the_disk(url: str, part: Path) -> None:
        part.write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    updater = Updater(
        root,
        signer.public_key,
        fetch=fills_the_disk,
        install=unzip_install,
        clock_ms=Clock(CLOCK_MS),
    )
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.failed is not None and outcome.failed.reason == "storage_failed"
    assert updater.journal() is None and not (root / "download").exists()


async def test_another_update_is_refused_while_one_is_under_way_the_same_resumed(site) -> None:
    root, bundle, signer = site
    updater = _updater(root, bundle, signer)
    first = updater.start("2.0", "https://gateway.test/bundle")
    # the same offer again (the gateway heard nothing for a while): resumed, not refused
    assert updater.start("2.0", "https://gateway.test/bundle") == first
    with pytest.raises(UpdateFailed) as caught:
        updater.start("3.0", "https://gateway.test/other")
    assert caught.value.reason == "busy"


def _run_child(root: Path, bundle: Path, signer: Signer, kill_at: str, mode: str) -> int:
    key = public_key_to_b64(signer.public_key)
    args = [sys.executable, str(CHILD), str(root), str(bundle), key, kill_at, mode]
    tests = str(Path(__file__).parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), tests])}
    return subprocess.run(args, timeout=60, check=False, env=env).returncode


@pytest.mark.parametrize("kill_at", FORWARD_POINTS)
async def test_a_power_cut_at_any_step_leaves_a_bootable_agent_that_finishes_the_update(
    site, kill_at: str
) -> None:
    root, bundle, signer = site
    assert _run_child(root, bundle, signer, kill_at, "forward") == -9
    # whatever the step, `current` names a whole version the launcher can start
    assert running_version(root) in ("1.0", "2.0")
    updater = _updater(root, bundle, signer)
    updater.boot()
    assert running_version(root) in ("1.0", "2.0")
    journal = updater.journal()
    assert journal is not None
    if journal.step != "trial":  # the agent resumes the steps at its start
        if journal.step != "installed":
            outcome = await updater.advance()
            assert outcome.ready and outcome.failed is None
        updater.switch()
        updater.boot()
        journal = updater.journal()
    assert journal is not None and journal.step == "trial"
    assert running_version(root) == "2.0"
    updater.commit(journal)
    assert _leftovers(root) == []


@pytest.mark.parametrize("kill_at", ["rolled_back"])
async def test_a_power_cut_during_a_rollback_still_ends_on_the_previous_version(
    site, kill_at: str
) -> None:
    root, bundle, signer = site
    assert _run_child(root, bundle, signer, kill_at, "back") == -9
    assert running_version(root) in ("1.0", "2.0")
    updater = _updater(root, bundle, signer)
    updater.boot()
    assert running_version(root) == "1.0"
    journal = updater.journal()
    assert journal is not None and journal.step == "rolled_back"
    updater.reported(journal)
    assert [p.name for p in (root / "versions").iterdir()] == ["1.0"]
    assert _leftovers(root) == []


async def test_pip_installs_the_wheels_offline_into_the_new_folder(site, tmp_path: Path) -> None:
    wheel = next((tmp_path / "wheels-2.0").iterdir())
    target = tmp_path / "new" / "site"
    await pip_install([wheel], target)
    assert 'VERSION = "2.0"' in (target / "ansimi_probe" / "__init__.py").read_text()


async def test_pip_failing_is_an_install_failure(tmp_path: Path) -> None:
    broken = tmp_path / "broken-1.0-py3-none-any.whl"
    broken.write_bytes(b"not a zip")
    with pytest.raises(UpdateFailed) as caught:
        await pip_install([broken], tmp_path / "site")
    assert caught.value.reason == "install_failed"


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """An HTTP server on loopback answering GET /bundle with `handler`; yields its URL."""
    app = web.Application()
    app.router.add_get("/bundle", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/bundle"
    finally:
        await runner.cleanup()


async def test_a_download_resumes_where_it_stopped(site, tmp_path: Path) -> None:
    _, bundle, _ = site
    ranges: list[str | None] = []

    async def serve(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        return web.FileResponse(bundle)

    data = bundle.read_bytes()
    part = tmp_path / "x.part"
    part.write_bytes(data[:1000])
    async with serving(serve) as url, aiohttp.ClientSession() as session:
        await http_fetch(session)(url, part)
        assert part.read_bytes() == data
        await http_fetch(session)(url, part)  # whole: 416
        assert part.read_bytes() == data
    assert ranges == ["bytes=1000-", f"bytes={len(data)}-"]


async def test_a_download_that_never_ends_is_cut_at_the_limit_and_deleted(site) -> None:
    # a wrong `public_url`, or a stolen gateway, must not fill the disk the outbox is on
    root, _, signer = site
    limit = 256 * 1024
    chunk = b"x" * 65536

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):  # 4 MB: bounded, far over the limit
            await response.write(chunk)
        return response

    async with serving(endless) as url, aiohttp.ClientSession() as session:
        updater = Updater(
            root,
            signer.public_key,
            fetch=http_fetch(session, max_bytes=limit),
            install=unzip_install,
            clock_ms=Clock(CLOCK_MS),
        )
        updater.start("2.0", url)
        outcome = await updater.advance()
    assert outcome.failed is not None and outcome.failed.reason == "too_large"
    assert updater.journal() is None and not (root / "download").exists()


def test_the_launcher_puts_the_current_version_first_on_the_path(site) -> None:
    root, _, _ = site
    env = launch_environment(root / "current", {"PYTHONPATH": "/elsewhere", "HOME": "/root"})
    first, rest = env["PYTHONPATH"].split(os.pathsep)
    assert first == str((root / "versions" / "1.0" / "site").resolve())
    assert rest == "/elsewhere" and env["HOME"] == "/root"


async def test_a_cut_download_is_reported_and_resumed_by_the_next_offer(site) -> None:
    root, bundle, signer = site
    sizes: list[int] = []

    def cut(name: str) -> None:
        if name == "fetch_half":
            raise ConnectionResetError("link lost")

    async def fetch(url: str, part: Path) -> None:
        sizes.append(part.stat().st_size if part.exists() else 0)
        await file_fetch(bundle, cut if len(sizes) == 1 else lambda _n: None)(url, part)

    updater = Updater(
        root, signer.public_key, fetch=fetch, install=unzip_install, clock_ms=Clock(CLOCK_MS)
    )
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.failed is not None and outcome.failed.reason == "download_failed"
    assert updater.journal() is None  # reported; the gateway offers it again later
    updater.start("2.0", "https://gateway.test/bundle")
    outcome = await updater.advance()
    assert outcome.ready
    # the second fetch began where the first stopped
    assert sizes == [0, bundle.stat().st_size // 2]
