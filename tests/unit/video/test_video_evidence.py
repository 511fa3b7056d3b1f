"""Evidence seals: they verify, and one changed byte anywhere makes them fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.video.evidence import SealBroken, seal_path, seal_recording, verify_seal
from protocol.jws import Signer
from protocol.keys import generate_key

SIGNER = Signer("gw-test", generate_key())


def resolve(kid: str):  # type: ignore[no-untyped-def]
    assert kid == "gw-test"
    return SIGNER.public_key


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    path = tmp_path / "clip.mp4"
    path.write_bytes(bytes(range(256)) * 40)
    seal_recording(path, SIGNER, device="doorbell-0001", session="s-123456789")
    return path


def test_seal_verifies_and_names_what_it_sealed(recording: Path) -> None:
    facts = verify_seal(recording, resolve)
    assert facts["device"] == "doorbell-0001"
    assert facts["file"] == "clip.mp4" and facts["size"] == 10240
    assert facts["gateway"] == "gw-test" and len(facts["sha256"]) == 64


@pytest.mark.parametrize("offset", [0, 5000, 10239])
def test_one_changed_byte_fails(recording: Path, offset: int) -> None:
    data = bytearray(recording.read_bytes())
    data[offset] ^= 0x01
    recording.write_bytes(bytes(data))
    with pytest.raises(SealBroken, match="SHA-256 differs"):
        verify_seal(recording, resolve)


def test_truncation_fails(recording: Path) -> None:
    recording.write_bytes(recording.read_bytes()[:-1])
    with pytest.raises(SealBroken, match="bytes, but"):
        verify_seal(recording, resolve)


def test_edited_sidecar_fails(recording: Path) -> None:
    sidecar = seal_path(recording)
    document = json.loads(sidecar.read_text())
    document["facts"]["device"] = "doorbell-0002"
    sidecar.write_text(json.dumps(document))
    with pytest.raises(SealBroken, match="differ from the signed"):
        verify_seal(recording, resolve)


def test_a_seal_by_another_key_fails(recording: Path) -> None:
    forger = Signer("gw-test", generate_key())
    seal_recording(recording, forger, device="doorbell-0001")
    with pytest.raises(SealBroken, match="signature does not verify"):
        verify_seal(recording, resolve)


def test_missing_seal_fails(tmp_path: Path) -> None:
    path = tmp_path / "unsealed.mp4"
    path.write_bytes(b"x")
    with pytest.raises(SealBroken, match="unreadable seal"):
        verify_seal(path, resolve)
