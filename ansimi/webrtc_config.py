"""WebRTC settings shared by the device's and the gateway's `[video]` sections.

Kept apart from `ansimi.webrtc` so that loading a config file does not import aiortc and
PyAV: the simulator loads thousands of device configs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

VideoCodec = Literal["H264", "VP8"]


class IceServer(BaseModel):
    """One STUN or TURN server, as in the W3C RTCIceServer dictionary."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # e.g. ["stun:stun.example:3478"] or ["turn:turn.example:3478?transport=udp"]
    urls: list[str] = Field(min_length=1)
    username: str | None = None
    credential: str | None = None
