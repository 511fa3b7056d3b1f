"""The recorder stores encoded frames as they are, in files PyAV can decode."""

from __future__ import annotations

import fractions
from pathlib import Path

import av
import pytest

from ansimi.privacy import DataKey, Keyring
from ansimi.webrtc import EncodedFrame, VideoCodec, is_keyframe
from device.hal.camera import SyntheticCamera
from device.video.track import to_video_frame
from gateway.video.encrypted import decrypt_to
from gateway.video.recorder import Recorder

KEYRING = Keyring([DataKey.generate()])


async def encoded_clip(codec: VideoCodec, count: int) -> list[EncodedFrame]:
    """`count` frames of the synthetic camera, encoded as a device would send them."""
    camera = SyntheticCamera(160, 120, 120)
    camera.start()
    ctx = av.CodecContext.create("libx264" if codec == "H264" else "libvpx", "w")
    ctx.width, ctx.height, ctx.pix_fmt = 160, 120, "yuv420p"
    ctx.time_base = fractions.Fraction(1, 15)
    ctx.gop_size = 5
    if codec == "H264":
        ctx.options = {"tune": "zerolatency"}
    frames = []
    for i in range(count):
        video = to_video_frame(await camera.capture())
        video.pts = i
        for packet in ctx.encode(video):
            data = bytes(packet)
            frames.append(EncodedFrame(codec, data, len(frames) * 6000, is_keyframe(codec, data)))
    for packet in ctx.encode(None):
        data = bytes(packet)
        frames.append(EncodedFrame(codec, data, len(frames) * 6000, is_keyframe(codec, data)))
    return frames


def decoded_frames(path: Path) -> int:
    """Frames a decoder gets from the plaintext of the encrypted recording at `path`."""
    plain = path.with_name(path.name + ".plain")
    with plain.open("wb") as f:
        decrypt_to(path, KEYRING, f)
    with av.open(str(plain)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize(("codec", "suffix"), [("H264", ".mp4"), ("VP8", ".webm")])
async def test_recording_decodes(tmp_path: Path, codec: VideoCodec, suffix: str) -> None:
    clip = await encoded_clip(codec, 20)
    assert clip[0].keyframe
    recorder = Recorder(tmp_path / "rec", KEYRING)
    for frame in clip:
        recorder.write(frame)
    path = recorder.close()
    assert path == tmp_path / f"rec{suffix}.enc"
    assert decoded_frames(path) == len(clip) == recorder.frames


async def test_frames_before_the_first_keyframe_are_dropped(tmp_path: Path) -> None:
    clip = await encoded_clip("H264", 12)
    later = next(f for f in clip[1:] if f.keyframe)
    recorder = Recorder(tmp_path / "rec", KEYRING)
    for frame in clip[1:]:
        recorder.write(frame)
    path = recorder.close()
    assert path is not None
    assert recorder.frames == len(clip) - clip.index(later)
    assert decoded_frames(path) == recorder.frames


def test_no_keyframe_no_file(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec", KEYRING)
    recorder.write(EncodedFrame("H264", b"\x00\x00\x00\x01\x41\x9a", 0, False))
    assert recorder.close() is None
    assert list(tmp_path.iterdir()) == []


def test_no_data_key_no_recording(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec", None)
    recorder.write(EncodedFrame("H264", b"\x00\x00\x00\x01\x65\x88", 0, True))
    assert recorder.close() is None
    assert list(tmp_path.iterdir()) == []
