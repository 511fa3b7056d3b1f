"""The gateway's `[video]` section: the hub's limits, recordings and ICE."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ansimi.webrtc_config import IceServer


class VideoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # device streams this gateway takes at once; one more is answered with a reason
    max_streams: Annotated[int, Field(ge=0, le=10_000)] = 64
    # live viewers (WHEP) per device stream
    max_viewers: Annotated[int, Field(ge=1, le=1_000)] = 16
    recordings_dir: Path = Path("/var/lib/ansimi/gateway/recordings")
    # recordings and their seals older than this are deleted; 0 keeps them forever
    retention_days: Annotated[float, Field(ge=0)] = 30.0
    # STUN/TURN servers for devices behind NAT; none by default
    ice_servers: list[IceServer] = []
    # also gather a 127.0.0.1 candidate: only for a gateway and devices on one host
    loopback_candidates: bool = False
    # seconds between viewer-count reports to the device (it stops when nobody watches)
    watch_report_s: Annotated[float, Field(gt=0)] = 2.0
    # this instance's API base URL as other instances reach it (https://gw-2.example:8443);
    # set on every instance of a cluster so a viewer on any of them sees every stream
    public_url: str = ""
