"""WebRTC plumbing shared by the device and the gateway (aiortc), in one place.

- `rtc_configuration`: ICE servers come from configuration only. With none, aiortc would
  otherwise ask a public STUN server (FIELD-NOTES), so an empty list is passed explicitly.
- `enable_loopback_candidates`: the one supported way to run WebRTC on loopback (tests, the
  demo, a gateway and its devices on one host). aioice never offers 127.0.0.1 as a host
  candidate (`aioice.ice.get_host_addresses` skips it), so a machine whose only interface
  is `lo` gathers no candidate at all. This wraps that function so that 127.0.0.1 is
  gathered too: a real socket is bound on 127.0.0.1 and announced in the SDP like any other
  host candidate. It is process-wide and off by default; the config flag
  `loopback_candidates` (device `[video]`, gateway `[video]`) turns it on.
- Codec helpers: codec names, preference order, and keyframe detection for pass-through.
- `EncodedTrack` and `tap_encoded`: move encoded frames (H.264 or VP8) through a process
  without decoding or re-encoding them: a gateway relays and records what the device sent.
- `Watcher`: a receive-only peer that counts frames (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import queue
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aioice.ice
import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from ansimi.errors import AnsimiError
from ansimi.webrtc_config import IceServer, VideoCodec

log = logging.getLogger(__name__)

__all__ = [
    "EncodedFrame",
    "EncodedTrack",
    "IceServer",
    "VideoCodec",
    "Watcher",
    "enable_loopback_candidates",
    "is_keyframe",
    "prefer_codecs",
    "request_keyframe",
    "rtc_configuration",
    "tap_encoded",
]

# RTP video clock (RFC 6184, RFC 7741): 90 kHz for both codecs.
VIDEO_TIME_BASE: Final = fractions.Fraction(1, 90_000)
LOOPBACK: Final = "127.0.0.1"


def rtc_configuration(ice_servers: Sequence[IceServer] = ()) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
            for s in ice_servers
        ]
    )


_original_host_addresses = aioice.ice.get_host_addresses


def _host_addresses_with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = list(_original_host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6))
    if use_ipv4 and LOOPBACK not in addresses:
        addresses.append(LOOPBACK)
    return addresses


def enable_loopback_candidates(enabled: bool = True) -> None:
    """Gather a 127.0.0.1 host candidate in every peer connection this process makes.

    Idempotent. Only for peers on the same host: a remote peer cannot reach our 127.0.0.1,
    it only costs it one failing connectivity check.
    """
    aioice.ice.get_host_addresses = (
        _host_addresses_with_loopback if enabled else _original_host_addresses
    )


def loopback_candidates_enabled() -> bool:
    return aioice.ice.get_host_addresses is _host_addresses_with_loopback


# -- codecs ------------------------------------------------------------------------------


def codec_of(mime_type: str) -> VideoCodec | None:
    name = mime_type.split("/")[-1].upper()
    return name if name in ("H264", "VP8") else None  # type: ignore[return-value]


def prefer_codecs(transceiver: RTCRtpTransceiver, order: Iterable[VideoCodec]) -> None:
    """Offer only the codecs in `order`, best first (with their RTX), via setCodecPreferences.

    Must run before createOffer (offerer) or setRemoteDescription (answerer: a transceiver
    made beforehand is matched to the offer and keeps these preferences).
    """
    capabilities = RTCRtpSender.getCapabilities("video").codecs
    chosen = []
    for codec in order:
        chosen += [c for c in capabilities if codec_of(c.mimeType) == codec]
    chosen += [c for c in capabilities if c.mimeType.lower() == "video/rtx"]
    transceiver.setCodecPreferences(chosen)


def is_keyframe(codec: VideoCodec, data: bytes) -> bool:
    """Whether an encoded frame starts a picture a decoder can begin with."""
    if codec == "VP8":
        # RFC 6386 9.1: bit 0 of the frame tag is 0 for a key frame
        return bool(data) and not data[0] & 1
    # Annex B: an IDR slice (NAL type 5) anywhere in the access unit
    at = 0
    while True:
        at = data.find(b"\x00\x00\x01", at)
        if at < 0 or at + 3 >= len(data):
            return False
        if data[at + 3] & 0x1F == 5:
            return True
        at += 3


# -- pass-through of encoded frames ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded picture: Annex B H.264 access unit or VP8 frame, with its RTP time."""

    codec: VideoCodec
    data: bytes
    timestamp: int  # 90 kHz ticks
    keyframe: bool

    def packet(self) -> av.Packet[Any]:
        packet = av.Packet(self.data)
        packet.pts = packet.dts = self.timestamp
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = self.keyframe
        return packet


class EncodedTrack(MediaStreamTrack):
    """A video track that yields encoded `av.Packet`s: aiortc sends them without encoding.

    Fed with `push()`; keeps at most `max_queue` frames (a slow consumer loses the oldest,
    never the loop's memory). `recv()` raises MediaStreamError once `stop()` was called.

    `from_keyframe`: take nothing before the first keyframe. A viewer who joins mid-stream
    would otherwise get P-frames it cannot decode; with pass-through the sender cannot make
    a keyframe for it, so it waits for the next one.
    """

    kind = "video"

    def __init__(self, max_queue: int = 60, *, from_keyframe: bool = False) -> None:
        super().__init__()
        self._queue: asyncio.Queue[EncodedFrame | None] = asyncio.Queue()
        self._max_queue = max_queue
        self._open = not from_keyframe

    def push(self, frame: EncodedFrame) -> None:
        if self.readyState != "live":
            return
        if not self._open:
            if not frame.keyframe:
                return
            self._open = True
        while self._queue.qsize() >= self._max_queue:
            self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self) -> av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._queue.get()
        if frame is None:
            raise MediaStreamError
        return frame.packet()

    def stop(self) -> None:
        if self.readyState == "live":
            self._queue.put_nowait(None)
        super().stop()


class _TapQueue(queue.Queue[Any]):
    """Stands in for an RTCRtpReceiver's decoder queue: encoded frames go to `sink` instead.

    aiortc's receiver puts `(codec, JitterFrame)` here from the event loop, and `None` to
    stop its decoder thread. We pass `None` on so the thread ends, and never decode.
    """

    def __init__(self, sink: Callable[[EncodedFrame], None]) -> None:
        super().__init__()
        self._sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None)
            return
        codec_params, jitter_frame = item
        codec = codec_of(codec_params.mimeType)
        if codec is None:
            return
        data = bytes(jitter_frame.data)
        try:
            self._sink(EncodedFrame(codec, data, jitter_frame.timestamp, is_keyframe(codec, data)))
        except Exception:
            # a sink bug must not break the receiver's RTP handling for this peer
            log.exception("encoded frame sink failed")


_DECODER_QUEUE: Final = "_RTCRtpReceiver__decoder_queue"


class TapUnsupported(AnsimiError, RuntimeError):
    """This aiortc has no decoder queue where we expect it: pin aiortc to a tested version."""


def tap_encoded(receiver: RTCRtpReceiver, sink: Callable[[EncodedFrame], None]) -> None:
    """Send the receiver's encoded frames to `sink` (on the loop) and skip decoding.

    Call after setRemoteDescription and before the connection starts receiving (before
    setLocalDescription on an answerer). It relies on one private attribute of aiortc's
    RTCRtpReceiver (tested with aiortc 1.16): if that ever moves, this raises at once
    instead of silently recording nothing.
    """
    if not isinstance(getattr(receiver, _DECODER_QUEUE, None), queue.Queue):
        raise TapUnsupported(
            "aiortc's RTCRtpReceiver has no decoder queue to tap: this aiortc version is "
            "untested with ansimi (tested: 1.16); pin aiortc or update ansimi.webrtc"
        )
    setattr(receiver, _DECODER_QUEUE, _TapQueue(sink))


async def request_keyframe(receiver: RTCRtpReceiver) -> None:
    """Ask the sender for a keyframe now (RTCP PLI), e.g. when a viewer joins."""
    for source in receiver.getSynchronizationSources():
        with contextlib.suppress(Exception):
            await receiver._send_rtcp_pli(source.source)


# -- a watching peer (tests, benchmarks, a console's server side) -----------------------


class Watcher:
    """A receive-only peer that counts the video frames it gets.

    `decode=True` counts pictures aiortc decoded (proof that the video is real);
    `decode=False` counts encoded frames without decoding them (cheap, for benchmarks).
    `first_frame_at` is the event loop's time of the first frame.
    """

    def __init__(self, ice_servers: Sequence[IceServer] = (), *, decode: bool = True) -> None:
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self._transceiver = self.pc.addTransceiver("video", direction="recvonly")
        self.decode = decode
        self.frames = 0
        self.first_frame_at: float | None = None
        self.frame_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if decode:
            self.pc.on("track", self._on_track)

    def _count(self) -> None:
        self.frames += 1
        if self.first_frame_at is None:
            self.first_frame_at = asyncio.get_running_loop().time()
        self.frame_event.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._task = asyncio.ensure_future(self._pull(track))

    async def _pull(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                self._count()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp: str = self.pc.localDescription.sdp
        return sdp

    async def answer(self, sdp: str) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))
        if not self.decode:
            tap_encoded(self._transceiver.receiver, lambda _frame: self._count())

    async def close(self) -> None:
        await self.pc.close()
        if self._task is not None:
            self._task.cancel()
