"""The shared WebRTC helpers: loopback candidates, ICE configuration, keyframes, frames."""

from __future__ import annotations

import aioice.ice
import av
from aiortc import RTCPeerConnection

from ansimi.webrtc import (
    IceServer,
    enable_loopback_candidates,
    is_keyframe,
    loopback_candidates_enabled,
    rtc_configuration,
)
from device.hal.camera import SyntheticCamera
from device.video.track import to_video_frame


def test_no_ice_servers_unless_configured() -> None:
    assert rtc_configuration().iceServers == []
    turn = IceServer(urls=["turn:turn.example:3478"], username="u", credential="p")
    (server,) = rtc_configuration([turn]).iceServers
    assert server.urls == ["turn:turn.example:3478"] and server.username == "u"


async def test_loopback_candidates_put_127_0_0_1_in_the_offer() -> None:
    try:
        enable_loopback_candidates(False)
        assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, False)
        enable_loopback_candidates()
        enable_loopback_candidates()  # idempotent
        assert loopback_candidates_enabled()
        assert aioice.ice.get_host_addresses(True, False).count("127.0.0.1") == 1
        pc = RTCPeerConnection(rtc_configuration())
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        await pc.close()
        assert " 127.0.0.1 " in pc.localDescription.sdp
        assert "typ host" in pc.localDescription.sdp
    finally:
        enable_loopback_candidates()  # the other video tests rely on it


def test_keyframe_detection() -> None:
    assert is_keyframe("H264", b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x68\x00\x00\x00\x01\x65")
    assert not is_keyframe("H264", b"\x00\x00\x00\x01\x41\x9a")
    assert not is_keyframe("H264", b"")
    assert is_keyframe("VP8", b"\x10\x02\x00\x9d\x01\x2a")
    assert not is_keyframe("VP8", b"\x11\x02\x00")
    assert not is_keyframe("VP8", b"")


async def test_camera_frame_becomes_the_same_video_frame() -> None:
    for width, height in ((320, 240), (176, 144)):  # 176: FFmpeg pads the chroma rows
        camera = SyntheticCamera(width, height, 30)
        camera.start()
        frame = await camera.capture()
        video = to_video_frame(frame)
        assert (video.width, video.height, video.format.name) == (width, height, "yuv420p")
        back = bytearray()
        for plane, w in zip(video.planes, (width, width // 2, width // 2), strict=True):
            raw = bytes(plane)
            back += b"".join(
                raw[r * plane.line_size : r * plane.line_size + w] for r in range(plane.height)
            )
        assert bytes(back) == frame.data
        assert isinstance(video, av.VideoFrame)
