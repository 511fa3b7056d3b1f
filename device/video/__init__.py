"""Live video on the device: the camera as a WebRTC track, sessions signalled over MQTT.

`config` is light (no aiortc import), so loading a device config stays cheap; `session`
and `track` import aiortc and PyAV and are imported only where video runs.
"""
