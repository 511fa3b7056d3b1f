"""Live video on the device: the camera as a WebRTC track, sessions signalled over MQTT."""

from device.video.config import VideoConfig
from device.video.session import VideoManager, VideoSession
from device.video.track import CameraTrack, to_video_frame

__all__ = ["CameraTrack", "VideoConfig", "VideoManager", "VideoSession", "to_video_frame"]
