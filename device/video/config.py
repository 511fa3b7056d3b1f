"""The device's `[video]` section: when live video starts and stops, codecs and ICE."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ansimi.webrtc_config import IceServer, VideoCodec


class VideoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # start video when this device raises an emergency alert (a doorbell's panic button)
    start_on_emergency: bool = True
    # start video on an ordinary doorbell ring too
    start_on_ring: bool = False
    # stop when no operator has watched for this many seconds (counted from the start)
    idle_stop_s: Annotated[float, Field(gt=0)] = 120.0
    # never stream longer than this in one go
    max_duration_s: Annotated[float, Field(gt=0)] = 600.0
    # give up on an offer the gateway has not answered within this many seconds
    answer_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # codecs offered, best first: H.264 (a Pi encodes it in hardware), VP8 as the fallback
    codecs: list[VideoCodec] = Field(default=["H264", "VP8"], min_length=1)
    # keep this many seconds before an alarm in the recording (0: off). The camera then runs
    # and encodes all the time: use the Pi's hardware encoder (`h264_v4l2m2m`)
    prealarm_s: Annotated[float, Field(ge=0, le=30)] = 0.0
    prealarm_encoder: str = "libx264"
    # STUN/TURN servers for a device behind NAT; none by default
    ice_servers: list[IceServer] = []
    # also gather a 127.0.0.1 candidate: only when the gateway runs on the same host
    loopback_candidates: bool = False
    # let an operator speak through the speaker ([hardware] speaker); never on a store bell
    talkback: bool = False
    # let the desk hear the door through the microphone ([hardware] microphone); never on a
    # store bell
    microphone: bool = False
