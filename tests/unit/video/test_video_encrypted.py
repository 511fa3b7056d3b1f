"""Encrypted recordings: nothing in clear, a killed recorder leaves every whole chunk
readable, one changed byte anywhere fails, rotation re-wraps without breaking the seal."""

from __future__ import annotations

import asyncio
import io
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import pytest
from ansimi_testkit import CENTRAL_TOML
from click.testing import CliRunner
from test_video_recorder import encoded_clip

from ansimi.privacy import DataKey, Keyring, load_keyring, write_keyring
from gateway.cli import gateway
from gateway.video.encrypted import RecordingBroken, check, decrypt_to, rewrap_all
from gateway.video.evidence import SealBroken, seal_recording, verify_seal
from gateway.video.recorder import Recorder
from protocol.jws import Signer
from protocol.keys import generate_key

SIGNER = Signer("gw-test", generate_key())


def resolve(kid: str):  # type: ignore[no-untyped-def]
    return SIGNER.public_key


def plaintext_frames(path: Path, keyring: Keyring) -> int:
    buffer = io.BytesIO()
    decrypt_to(path, keyring, buffer)
    buffer.seek(0)
    with av.open(buffer, format="mp4") as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.fixture
def keyring() -> Keyring:
    return Keyring([DataKey.generate()])


@pytest.fixture
async def sealed(tmp_path: Path, keyring: Keyring) -> Path:
    recorder = Recorder(tmp_path / "dev" / "rec", keyring)
    for frame in await encoded_clip("H264", 60):
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    seal_recording(path, SIGNER, keyring, device="doorbell-0001", session="s-1")
    return path


async def test_nothing_on_disk_is_in_clear(sealed: Path, keyring: Keyring) -> None:
    raw = sealed.read_bytes()
    plain = io.BytesIO()
    opened = decrypt_to(sealed, keyring, plain)
    assert opened.complete and opened.chunks >= 3
    # the MP4 boxes and any 32-byte window of the plaintext are nowhere in the file
    assert b"ftyp" not in raw and b"moof" not in raw and b"mdat" not in raw
    data = plain.getvalue()
    assert all(data[i : i + 32] not in raw for i in range(0, len(data) - 32, 997))
    assert plaintext_frames(sealed, keyring) == 60


async def test_seal_covers_ciphertext_and_plaintext(sealed: Path, keyring: Keyring) -> None:
    facts = verify_seal(sealed, resolve, keyring)
    assert facts["complete"] is True and facts["recording"] == "rec.mp4"
    assert len(facts["ciphertext_sha256"]) == len(facts["plaintext_sha256"]) == 64
    assert facts["ciphertext_sha256"] != facts["plaintext_sha256"]


@pytest.mark.parametrize("where", [0.0, 0.02, 0.5, 0.999])
async def test_a_flipped_byte_fails_verification(
    sealed: Path, keyring: Keyring, where: float
) -> None:
    data = bytearray(sealed.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    sealed.write_bytes(bytes(data))
    with pytest.raises(SealBroken):
        verify_seal(sealed, resolve, keyring)


async def test_a_dropped_last_chunk_fails_the_seal(sealed: Path, keyring: Keyring) -> None:
    opened = check(sealed, keyring)
    data = sealed.read_bytes()
    # the final chunk is the empty one closing the file: 5-byte record head + nonce + tag
    sealed.write_bytes(data[: -(5 + 12 + 16)])
    assert not check(sealed, keyring).complete
    assert check(sealed, keyring).chunks == opened.chunks - 1
    with pytest.raises(SealBroken, match="chunks"):
        verify_seal(sealed, resolve, keyring)


async def test_a_chunk_moved_to_another_recording_fails(
    tmp_path: Path, sealed: Path, keyring: Keyring
) -> None:
    other = Recorder(tmp_path / "dev" / "other", keyring)
    for frame in await encoded_clip("H264", 30):
        other.write(frame)
    other_path = other.close()
    assert other_path is not None
    # same key, but the chunks are bound to their recording and place: a spliced file fails
    head = sealed.read_bytes()[:400]
    other_path.write_bytes(head + other_path.read_bytes()[400:])
    with pytest.raises(RecordingBroken):
        check(other_path, keyring)


async def test_another_sites_key_cannot_open(sealed: Path) -> None:
    with pytest.raises(RecordingBroken, match="content key"):
        check(sealed, Keyring([DataKey.generate()]))


async def test_rotation_rewraps_and_the_seal_still_holds(sealed: Path, keyring: Keyring) -> None:
    rotated = Keyring([DataKey.generate(), *keyring.keys])
    assert rewrap_all(sealed.parent.parent, rotated) == 1
    new_only = Keyring([rotated.current])
    assert verify_seal(sealed, resolve, new_only)["complete"] is True
    with pytest.raises(SealBroken, match="content key"):
        verify_seal(sealed, resolve, keyring)
    assert rewrap_all(sealed.parent.parent, new_only) == 0


_KILLED_RECORDER = textwrap.dedent(
    """
    import os, pickle, signal, sys
    from pathlib import Path
    from ansimi.privacy import load_keyring
    from gateway.video.recorder import Recorder

    frames = pickle.loads(Path(sys.argv[1]).read_bytes())
    recorder = Recorder(Path(sys.argv[2]), load_keyring(Path(sys.argv[3])))
    for frame in frames:
        recorder.write(frame)
    os.kill(os.getpid(), signal.SIGKILL)  # no close(): the process dies mid-recording
    """
)


async def test_a_killed_recording_reads_up_to_its_last_whole_chunk(
    tmp_path: Path, keyring: Keyring
) -> None:
    key_file = tmp_path / "privacy.key"
    write_keyring(key_file, keyring)
    clip = await encoded_clip("H264", 90)  # 6 s of video at 90 kHz / 6000 per frame
    (tmp_path / "clip.pickle").write_bytes(pickle.dumps(clip))
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            _KILLED_RECORDER,
            str(tmp_path / "clip.pickle"),
            str(tmp_path / "rec"),
            str(key_file),
        ],
        timeout=120,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL
    path = tmp_path / "rec.mp4.enc"
    opened = check(path, keyring)
    assert not opened.complete and opened.chunks >= 3
    decoded = plaintext_frames(path, keyring)
    assert 0 < decoded < len(clip)
    # the gateway seals what is there as incomplete; that seal then verifies
    seal_recording(path, SIGNER, keyring, device="doorbell-0001", session="s-1")
    facts = verify_seal(path, resolve, keyring)
    assert facts["complete"] is False and facts["chunks"] == opened.chunks


async def test_cli_key_rotation_keeps_recordings_readable(tmp_path: Path) -> None:
    key_file = tmp_path / "privacy.key"
    recordings = tmp_path / "recordings"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'database = "{tmp_path / "gateway.db"}"\n[privacy]\nkey_file = "{key_file}"\n'
        f'[video]\nrecordings_dir = "{recordings}"\n' + CENTRAL_TOML
    )
    runner = CliRunner()
    assert runner.invoke(gateway, ["privacy-key", "init", "--config", str(config)]).exit_code == 0
    recorder = Recorder(recordings / "doorbell-0001" / "rec", load_keyring(key_file))
    for frame in await encoded_clip("H264", 20):
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    # the command runs its own event loop, as from a shell: not inside this test's
    rotated = await asyncio.to_thread(
        runner.invoke, gateway, ["privacy-key", "rotate", "--config", str(config)]
    )
    assert rotated.exit_code == 0, rotated.output
    ring = load_keyring(key_file)
    assert len(ring.keys) == 1  # the old key is gone, and the recording still opens
    assert plaintext_frames(path, ring) == 20
