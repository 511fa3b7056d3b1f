"""`ansimi gateway export-evidence`: a playable recording and a check anyone can repeat
with openssl and ffprobe; every export audited; a tampered recording is not exported."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from ansimi_testkit import CENTRAL_TOML
from click.testing import CliRunner
from test_video_recorder import encoded_clip

from ansimi.privacy import load_keyring
from gateway.cli import gateway
from gateway.store import Device, Incoming, SqliteDatabase
from gateway.video import audit
from gateway.video.evidence import seal_recording
from gateway.video.recorder import Recorder
from protocol.jws import Signer
from protocol.keys import generate_key, load_private_key, save_private_key

DOORBELL = "doorbell-0001"
EVENT = "0f8fad5bd9cb469fa16570867728950e"


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    recordings = tmp_path / "recordings"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'id = "gw-test"\ndatabase = "{tmp_path / "gateway.db"}"\n'
        f'signing_key = "{tmp_path / "signing.key"}"\n'
        f'[privacy]\nkey_file = "{tmp_path / "privacy.key"}"\n'
        f'[video]\nrecordings_dir = "{recordings}"\n' + CENTRAL_TOML
    )
    save_private_key(tmp_path / "signing.key", generate_key())
    assert (
        CliRunner().invoke(gateway, ["privacy-key", "init", "--config", str(config)]).exit_code == 0
    )
    return config, recordings


async def _record(tmp_path: Path, recordings: Path, at_s: float) -> Path:
    store = SqliteDatabase(tmp_path / "gateway.db")
    store.add_device(Device(DOORBELL, "k" * 43, "doorbell", "mapo"), now_ms=0)
    store.add_event(
        Incoming(EVENT, DOORBELL, 1, "alert", int(at_s * 1000), "{}", "a.b.c", ()), now_ms=0
    )
    store.close()
    keyring = load_keyring(tmp_path / "privacy.key")
    recorder = Recorder(recordings / DOORBELL / "20261204T120000Z-session", keyring)
    for frame in await encoded_clip("H264", 45):
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    signer = Signer("gw-test", load_private_key(tmp_path / "signing.key"))
    seal_recording(path, signer, keyring, device=DOORBELL, started=at_s - 2, ended=at_s + 3)
    return path


async def _export(config: Path, out: Path, *extra: str) -> tuple[int, str]:
    # the command runs its own event loop, as from a shell: not inside this test's
    result = await asyncio.to_thread(
        CliRunner().invoke,
        gateway,
        ["export-evidence", EVENT, "--config", str(config), "--out", str(out), *extra],
    )
    return result.exit_code, result.output


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command.split(), cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


VERIFY_SIGNATURE = (
    "openssl pkeyutl -verify -pubin -inkey gateway-public.pem -rawin"
    " -in evidence.json -sigfile evidence.json.sig"
)


@pytest.fixture
async def recorded(tmp_path: Path) -> tuple[Path, Path]:
    config, recordings = _setup(tmp_path)
    await _record(tmp_path, recordings, time.time())
    return config, recordings


@pytest.mark.skipif(not shutil.which("ffprobe"), reason="ffprobe (Debian ffmpeg) not installed")
async def test_export_verifies_with_openssl_and_plays_with_ffprobe(
    tmp_path: Path, recorded: tuple[Path, Path]
) -> None:
    config, recordings = recorded
    out = tmp_path / "case-2026-0412"
    code, output = await _export(
        config, out, "--operator", "kim.desk", "--reason", "police case 0412"
    )
    assert code == 0, output
    evidence = json.loads((out / "evidence.json").read_text())
    (recording,) = evidence["recordings"]
    assert recording["file"] == "20261204T120000Z-session.mp4" and recording["complete"]
    # the documented commands, as an outsider runs them
    signature = _run(VERIFY_SIGNATURE, out)
    assert signature.returncode == 0 and "Signature Verified Successfully" in signature.stdout
    digest = _run(f"openssl dgst -sha256 {recording['file']}", out)
    assert digest.stdout.strip().endswith(recording["sha256"])
    probe = _run(
        "ffprobe -v error -count_frames -of json -show_entries"
        f" stream=codec_name,width,height,nb_read_frames {recording['file']}",
        out,
    )
    (stream,) = json.loads(probe.stdout)["streams"]
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 45
    # the commands in VERIFY.txt are the ones just run
    verify = (out / "VERIFY.txt").read_text()
    assert VERIFY_SIGNATURE in " ".join(verify.split())
    assert f"openssl dgst -sha256 {recording['file']}" in verify
    # a changed byte in the export fails the same check
    body = bytearray((out / "evidence.json").read_bytes())
    body[body.index(b"police")] ^= 0x20
    (out / "evidence.json").write_bytes(bytes(body))
    forged = _run(VERIFY_SIGNATURE, out)
    assert forged.returncode != 0
    # audited with who and why
    (entry,) = audit.read(recordings)
    assert entry["action"] == "export" and entry["operator"] == "kim.desk"
    assert entry["reason"] == "police case 0412" and entry["event"] == EVENT


async def test_no_export_without_operator_and_reason(tmp_path: Path) -> None:
    config, recordings = _setup(tmp_path)
    await _record(tmp_path, recordings, time.time())
    code, output = await _export(config, tmp_path / "out", "--operator", " ", "--reason", "x")
    assert code != 0 and "audited" in output
    assert not (tmp_path / "out").exists() and audit.read(recordings) == []


async def test_a_tampered_recording_is_not_exported(tmp_path: Path) -> None:
    config, recordings = _setup(tmp_path)
    path = await _record(tmp_path, recordings, time.time())
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, output = await _export(config, tmp_path / "out", "--operator", "kim", "--reason", "case")
    assert code != 0 and "not exported" in output
    assert not (tmp_path / "out").exists() and audit.read(recordings) == []


async def test_a_recording_of_another_time_is_not_the_events(tmp_path: Path) -> None:
    config, recordings = _setup(tmp_path)
    path = await _record(tmp_path, recordings, time.time())
    # the same device, but sealed as recorded a day before the event
    facts_file = path.with_name(path.name + ".seal.json")
    os.unlink(facts_file)
    signer = Signer("gw-test", load_private_key(tmp_path / "signing.key"))
    day_before = time.time() - 86_400
    seal_recording(
        path,
        signer,
        load_keyring(tmp_path / "privacy.key"),
        device=DOORBELL,
        started=day_before,
        ended=day_before + 5,
    )
    code, output = await _export(config, tmp_path / "out", "--operator", "kim", "--reason", "case")
    assert code != 0 and "no sealed recording" in output


def test_the_audit_chain_shows_an_edited_line(tmp_path: Path) -> None:
    audit.append(tmp_path, "export", operator="kim", reason="case 1", event="e1")
    audit.append(tmp_path, "playback", operator="lee", reason="review", event="e1")
    assert [e["operator"] for e in audit.read(tmp_path)] == ["kim", "lee"]
    log = audit.audit_path(tmp_path)
    log.write_text(log.read_text().replace("case 1", "case 2"))
    with pytest.raises(audit.AuditError, match="line 2 does not follow line 1"):
        audit.read(tmp_path)
