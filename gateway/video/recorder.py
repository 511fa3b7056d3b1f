"""Record encoded frames as they arrive, without re-encoding, into a crash-safe encrypted file.

H.264 goes into fragmented MP4 (`frag_keyframe+empty_moov+default_base_moof`, and a
fragment at least every second, flushed to the OS as written), so a gateway killed
mid-recording leaves a file that plays up to its last fragment. Devices send keyframes
rarely (x264's default interval is long), so cutting only at keyframes would leave
minutes unwritten. VP8 cannot go into MP4 with FFmpeg, so it goes into
WebM (Matroska clusters are also readable up to a truncation).

The container needs the stream's parameters (size, and for H.264 the SPS/PPS) before its
header. They are read from the first keyframe, by opening that one frame as a tiny
in-memory raw stream; frames before it are dropped (no decoder could use them anyway).

The muxer never writes to disk itself: it writes into an `encrypted.ChunkWriter`, and the
recorder cuts an encrypted chunk after each second of video, so a crash loses about two
seconds at most (the fragment being muxed and the chunk being filled) and every chunk
before stays readable. In the gateway the chunks reach the disk through one
`encrypted.DiskThread`, off the event loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import struct
import time
from pathlib import Path
from typing import Final

import av

from ansimi.privacy import Keyring
from ansimi.webrtc import VIDEO_TIME_BASE, EncodedFrame, VideoCodec
from gateway.video.encrypted import SUFFIX as ENCRYPTED
from gateway.video.encrypted import ChunkWriter, DiskThread

log = logging.getLogger(__name__)

SUFFIX: Final[dict[VideoCodec, str]] = {"H264": ".mp4", "VP8": ".webm"}
_MP4_FLAGS: Final = "frag_keyframe+empty_moov+default_base_moof"
# A crash loses at most the fragment being written: about this much video.
_FRAGMENT_US: Final = 1_000_000
# and an encrypted chunk is cut after this much video (RTP 90 kHz ticks)
_CHUNK_TICKS: Final = 90_000


def _ivf(frame: EncodedFrame) -> bytes:
    """A one-frame IVF file, so FFmpeg's ivf demuxer can probe a VP8 keyframe."""
    # VP8 key frame header (RFC 6386 9.1): 3-byte tag, start code, then 14-bit sizes
    width, height = struct.unpack_from("<HH", frame.data, 6)
    header = struct.pack(
        "<4sHH4sHHIIII", b"DKIF", 0, 32, b"VP80", width & 0x3FFF, height & 0x3FFF, 90_000, 1, 1, 0
    )
    return header + struct.pack("<IQ", len(frame.data), 0) + frame.data


class Recorder:
    """Writes one stream to `path_stem` + .mp4.enc/.webm.enc; `close()` finishes the file."""

    def __init__(
        self, path_stem: Path, keyring: Keyring | None, *, disk: DiskThread | None = None
    ) -> None:
        """Without a data key (`keyring` None) nothing is recorded: never video in clear.

        With `disk`, the file writes happen on that thread: await `finished()` after
        `close()` before reading the file back.
        """
        self._stem = path_stem
        self._keyring = keyring
        self._disk = disk
        self.path: Path | None = None
        self._sink: ChunkWriter | None = None
        self._last_cut = 0
        self.frames = 0
        self.started_at: float | None = None
        self._out: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._template: av.container.InputContainer | None = None
        self._t0: int | None = None
        self._last_pts = -1
        self.closed = False

    def write(self, frame: EncodedFrame) -> None:
        if self.closed or self._keyring is None:
            return
        if self._out is None:
            if not frame.keyframe:
                return
            self._open(frame)
        assert self._out is not None and self._stream is not None
        if self._t0 is None:
            self._t0 = frame.timestamp
        # RTP time wraps at 2**32 (13 h at 90 kHz); keep pts rising across the wrap
        pts = (frame.timestamp - self._t0) % 2**32
        if pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        packet = av.Packet(frame.data)
        packet.pts = packet.dts = pts
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = frame.keyframe
        packet.stream = self._stream
        self._out.mux(packet)
        self.frames += 1
        if pts - self._last_cut >= _CHUNK_TICKS:
            self._last_cut = pts
            assert self._sink is not None
            self._sink.cut()

    def _open(self, first: EncodedFrame) -> None:
        raw = first.data if first.codec == "H264" else _ivf(first)
        template = av.open(io.BytesIO(raw), format="h264" if first.codec == "H264" else "ivf")
        assert isinstance(template, av.container.InputContainer)
        self._template = template
        source = template.streams.video[0]
        assert self._keyring is not None
        plain_name = self._stem.with_suffix(SUFFIX[first.codec]).name
        self.path = self._stem.with_name(plain_name + ENCRYPTED)
        self._sink = ChunkWriter(
            self.path, self._keyring, recording=plain_name, codec=first.codec, disk=self._disk
        )
        # every write reaches the chunk writer at once, so a cut holds all video muxed so far
        options = {"flush_packets": "1"}
        if first.codec == "H264":
            # a fragment at each keyframe and at least every second, whichever comes first
            options |= {"movflags": _MP4_FLAGS, "frag_duration": str(_FRAGMENT_US)}
        else:
            options |= {"cluster_time_limit": str(_FRAGMENT_US // 1000)}
        container_format = "mp4" if first.codec == "H264" else "webm"
        self._out = av.open(self._sink, "w", format=container_format, options=options)
        self._stream = self._out.add_stream_from_template(source)
        self._stream.time_base = VIDEO_TIME_BASE
        self.started_at = time.time()
        log.info("recording to %s (%s)", self.path, first.codec)

    def close(self) -> Path | None:
        """Finish the file; returns its path, or None if no keyframe ever came."""
        if self.closed:
            return self.path
        self.closed = True
        if self._out is not None:
            assert self._sink is not None
            try:
                self._out.close()
                self._sink.close()
            finally:
                # a muxer that failed to finish leaves the file without its final chunk
                self._sink.abandon()
                if self._template is not None:
                    self._template.close()
        return self.path

    async def finished(self) -> None:
        """Wait until the file is written and closed (at once without a disk thread)."""
        if self._sink is not None and self._sink.finished is not None:
            await asyncio.wrap_future(self._sink.finished)
