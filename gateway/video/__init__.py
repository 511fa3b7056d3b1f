"""The gateway's video hub: device streams in, recordings sealed, live viewers out (WHEP)."""

from gateway.video.config import VideoConfig
from gateway.video.evidence import SealBroken, seal_recording, verify_seal
from gateway.video.hub import BadOffer, DeviceOffline, TooManyViewers, VideoError, VideoHub

__all__ = [
    "BadOffer",
    "DeviceOffline",
    "SealBroken",
    "TooManyViewers",
    "VideoConfig",
    "VideoError",
    "VideoHub",
    "seal_recording",
    "verify_seal",
]
