"""Evidence seals: they verify, and a changed sidecar or another key makes them fail.

(Changed bytes in the recording itself: test_video_encrypted.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_video_recorder import encoded_clip

from ansimi.privacy import DataKey, Keyring
from gateway.video.evidence import SealBroken, seal_path, seal_recording, verify_seal
from gateway.video.recorder import Recorder
from protocol.jws import Signer
from protocol.keys import generate_key

SIGNER = Signer("gw-test", generate_key())
KEYRING = Keyring([DataKey.generate()])


def resolve(kid: str):  # type: ignore[no-untyped-def]
    assert kid == "gw-test"
    return SIGNER.public_key


@pytest.fixture
async def recording(tmp_path: Path) -> Path:
    recorder = Recorder(tmp_path / "clip", KEYRING)
    for frame in await encoded_clip("H264", 20):
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    seal_recording(path, SIGNER, KEYRING, device="doorbell-0001", session="s-123456789")
    return path


async def test_seal_verifies_and_names_what_it_sealed(recording: Path) -> None:
    facts = verify_seal(recording, resolve, KEYRING)
    assert facts["device"] == "doorbell-0001"
    assert facts["file"] == "clip.mp4.enc" and facts["recording"] == "clip.mp4"
    assert facts["gateway"] == "gw-test" and facts["codec"] == "H264"


async def test_edited_sidecar_fails(recording: Path) -> None:
    sidecar = seal_path(recording)
    document = json.loads(sidecar.read_text())
    document["facts"]["device"] = "doorbell-0002"
    sidecar.write_text(json.dumps(document))
    with pytest.raises(SealBroken, match="differ from the signed"):
        verify_seal(recording, resolve, KEYRING)


async def test_a_seal_by_another_key_fails(recording: Path) -> None:
    forger = Signer("gw-test", generate_key())
    seal_recording(recording, forger, KEYRING, device="doorbell-0001")
    with pytest.raises(SealBroken, match="signature does not verify"):
        verify_seal(recording, resolve, KEYRING)


def test_missing_seal_fails(tmp_path: Path) -> None:
    path = tmp_path / "unsealed.mp4.enc"
    path.write_bytes(b"x")
    with pytest.raises(SealBroken, match="unreadable seal"):
        verify_seal(path, resolve, KEYRING)
