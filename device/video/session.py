"""Live video sessions on the device: when to stream, and the offer/answer over MQTT.

One session at a time (one camera). It starts on an emergency alert (if
`start_on_emergency`), on a doorbell ring (if `start_on_ring`) or on the operator's
`video_start` command, and stops on `video_stop`, on the gateway's `bye` or refusal, when
nobody has watched for `idle_stop_s`, or after `max_duration_s`.

Signalling rides the device's own signed messages: the offer goes up as an `rtc` message
through the link's `send` (ICE candidates inside the SDP, gathered first), the gateway's
signed answer comes back on `down/rtc`. The gateway reports its viewer count over a data
channel the device opens, which is how the device knows whether anyone watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.stats import RTCRemoteInboundRtpStreamStats

from ansimi.logs import WIRE
from ansimi.webrtc import enable_loopback_candidates, prefer_codecs, rtc_configuration
from device.hal.ports import AudioInput, AudioOutput, Camera, HalError
from device.video.adapt import LinkState, adapt
from device.video.config import VideoConfig
from device.video.prealarm import Prealarm
from device.video.track import CameraTrack, MicrophoneTrack
from protocol.ids import new_message_id
from protocol.messages import Alert, Command, CommandMessage, Message, Rtc, RtcMessage

log = logging.getLogger(__name__)
# SDP in full: only with `--debug-log ansimi.webrtc.wire` (ansimi/logs.py), never at -v
wire_log = logging.getLogger(WIRE)

SendRtc = Callable[[Rtc], object]
TrackFactory = Callable[[], MediaStreamTrack]
MAX_SDP = 10_000  # the wire contract's bound on Rtc.sdp
# alert triggers that mean someone is in danger (not a ring, not housekeeping)
EMERGENCY_TRIGGERS = frozenset({"press", "long_press", "duress", "tamper"})


@dataclass(eq=False)
class VideoSession:
    id: str
    reason: str
    pc: RTCPeerConnection
    track: MediaStreamTrack
    started: float
    last_watched: float
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    viewers: int = 0
    ended: str | None = None
    link: LinkState = field(default_factory=LinkState)
    microphone: MicrophoneTrack | None = None


class VideoManager:
    """Runs the device's video sessions; the agent feeds it alerts, inputs and downlink."""

    def __init__(
        self,
        config: VideoConfig,
        camera: Camera | None,
        send: SendRtc,
        *,
        track_factory: TrackFactory | None = None,
        speaker: AudioOutput | None = None,
        microphone: AudioInput | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`speaker`: where an operator's talk-back plays; `microphone`: what the desk hears
        at the door. None (the default) for both: the offer has no audio at all."""
        self.config = config
        self._speaker = speaker
        self._microphone = microphone
        self._send = send
        self._clock = clock
        self._codecs = list(config.codecs)
        self.prealarm: Prealarm | None = None
        if track_factory is None and camera is not None:
            if config.prealarm_s > 0:
                # our encoder's H.264 goes out as it is: no VP8 then
                self.prealarm = Prealarm(camera, config.prealarm_s, encoder=config.prealarm_encoder)
                track_factory = self.prealarm.track
                self._codecs = ["H264"]
            else:
                track_factory = lambda: CameraTrack(camera)  # noqa: E731
        self._track_factory = track_factory
        # sessions start and stop the camera, unless the pre-alarm buffer keeps it running
        self._session_camera = camera if self.prealarm is None else None
        self.session: VideoSession | None = None
        self.history: list[tuple[str, str]] = []  # (session id, why it ended), for tests/ops
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        if config.loopback_candidates:
            enable_loopback_candidates()

    @property
    def available(self) -> bool:
        return self._track_factory is not None

    # ---- triggers (sync: called from the agent's handlers on the loop) ---------------

    def on_alert(self, alert: Alert) -> None:
        if alert.trigger == "doorbell_ring":
            if self.config.start_on_ring:
                self.start("doorbell ring")
        elif alert.trigger in EMERGENCY_TRIGGERS and self.config.start_on_emergency:
            self.start(f"emergency ({alert.trigger})")

    def on_command(self, command: Command) -> None:
        if command.name == "video_start":
            self.start("operator command")
        elif command.name == "video_stop":
            self.stop("operator command")

    def on_rtc(self, rtc: Rtc) -> None:
        self._spawn(self._on_rtc(rtc))

    def on_down(self, message: Message) -> None:
        """Video commands and the gateway's rtc answers; anything else is ignored."""
        if isinstance(message, CommandMessage):
            self.on_command(message.body)
        elif isinstance(message, RtcMessage):
            self.on_rtc(message.body)

    def start(self, reason: str) -> None:
        self._spawn(self._start(reason))

    def stop(self, reason: str) -> None:
        self._spawn(self._stop(reason, tell_gateway=True))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("video: a session step failed", exc_info=task.exception())

    # ---- the session -----------------------------------------------------------------

    async def _start(self, reason: str) -> None:
        async with self._lock:
            if self.session is not None:
                log.info(
                    "video: already streaming (%s); %s changes nothing", self.session.reason, reason
                )
                return
            if self._track_factory is None:
                log.warning("video: %s, but this device has no camera", reason)
                return
            pc = RTCPeerConnection(rtc_configuration(self.config.ice_servers))
            track = self._track_factory()
            now = self._clock()
            session = VideoSession(new_message_id(), reason, pc, track, now, now)
            self.session = session
            try:
                if self._session_camera is not None:
                    self._session_camera.start()
                transceiver = pc.addTransceiver(track, direction="sendonly")
                prefer_codecs(transceiver, self._codecs)
                channel = pc.createDataChannel("ansimi-video")
                channel.on("message", lambda data: self._on_report(session, data))
                if self._microphone is not None or self._speaker is not None:
                    # the speaker receives (silence until an operator talks), the microphone
                    # sends: one audio section, in the directions this device has
                    session.microphone = (
                        MicrophoneTrack(self._microphone) if self._microphone else None
                    )
                    direction = {
                        (True, True): "sendrecv",
                        (True, False): "sendonly",
                        (False, True): "recvonly",
                    }[(session.microphone is not None, self._speaker is not None)]
                    pc.addTransceiver(session.microphone or "audio", direction=direction)
                if self._speaker is not None:
                    speaker = self._speaker
                    pc.on(
                        "track",
                        lambda t: (
                            self._spawn(self._play(t, speaker)) if t.kind == "audio" else None
                        ),
                    )

                @pc.on("connectionstatechange")
                async def _on_state() -> None:
                    if pc.connectionState == "failed":
                        await self._stop("connection failed", tell_gateway=False, only=session)

                # setLocalDescription gathers every candidate first: they ride in the SDP
                await pc.setLocalDescription(await pc.createOffer())
                sdp = pc.localDescription.sdp
                if len(sdp) > MAX_SDP:
                    raise ValueError(f"offer SDP is {len(sdp)} chars, over the {MAX_SDP} limit")
                wire_log.debug("video: session %s offer SDP:\n%s", session.id, sdp)
                self._send(Rtc(kind="offer", session=session.id, sdp=sdp))
            except Exception as exc:
                log.error("video: could not offer a stream (%s): %s", reason, exc)
                await self._close(session, f"offer failed: {exc}")
                return
            log.info("video: offered session %s (%s)", session.id, reason)
        try:
            async with asyncio.timeout(self.config.answer_timeout_s):
                await session.answered.wait()
        except TimeoutError:
            await self._stop("no answer from the gateway", tell_gateway=True, only=session)

    async def _on_rtc(self, rtc: Rtc) -> None:
        session = self.session
        if session is None or rtc.session != session.id:
            log.info("video: rtc %s for session %s, which is not current", rtc.kind, rtc.session)
            return
        if rtc.kind == "bye":
            await self._stop(f"gateway: {rtc.reason or 'bye'}", tell_gateway=False, only=session)
        elif rtc.kind == "answer" and rtc.sdp is None:
            await self._stop(
                f"refused: {rtc.reason or 'no reason'}", tell_gateway=False, only=session
            )
        elif rtc.kind == "answer" and rtc.sdp is not None and not session.answered.is_set():
            session.answered.set()
            wire_log.debug("video: session %s answer SDP:\n%s", session.id, rtc.sdp)
            try:
                await session.pc.setRemoteDescription(RTCSessionDescription(rtc.sdp, "answer"))
            except Exception as exc:
                await self._stop(f"bad answer: {exc}", tell_gateway=True, only=session)

    async def _play(self, track: MediaStreamTrack, speaker: AudioOutput) -> None:
        """The operator's voice (decoded opus: 16-bit PCM) to the speaker, until the end."""
        started = False
        try:
            while True:
                frame = await track.recv()
                if not started:
                    speaker.start(frame.sample_rate, len(frame.layout.channels))  # type: ignore[union-attr]
                    started = True
                speaker.play(frame.to_ndarray().tobytes())  # type: ignore[union-attr]
        except MediaStreamError:
            pass
        except HalError as exc:
            log.error("video: talk-back cannot play: %s", exc)
        finally:
            if started:
                speaker.stop()

    def _on_report(self, session: VideoSession, data: object) -> None:
        try:
            viewers = int(json.loads(data)["viewers"])  # type: ignore[arg-type]
        except (ValueError, KeyError, TypeError):
            return
        session.viewers = viewers
        if viewers > 0:
            session.last_watched = self._clock()

    async def _stop(
        self, reason: str, *, tell_gateway: bool, only: VideoSession | None = None
    ) -> None:
        async with self._lock:
            session = self.session
            if session is None or (only is not None and session is not only):
                return
            if tell_gateway:
                with contextlib.suppress(Exception):
                    self._send(Rtc(kind="bye", session=session.id, reason=reason[:200]))
            await self._close(session, reason)

    async def _close(self, session: VideoSession, reason: str) -> None:
        session.ended = reason
        if self.session is session:
            self.session = None
        session.track.stop()
        if session.microphone is not None:
            session.microphone.stop()
        await session.pc.close()
        if self._session_camera is not None:
            self._session_camera.stop()
        self.history.append((session.id, reason))
        log.info("video: session %s ended: %s", session.id, reason)

    async def follow_link(self) -> None:
        """Set the frame rate from the loss the gateway reports (RTCP receiver reports).

        Only a live-encoded camera track can skip frames; the pre-alarm's own encoder keeps
        its rate (aiortc's congestion feedback does not reach it either).
        """
        session = self.session
        if session is None or not isinstance(session.track, CameraTrack):
            return
        stats = await session.pc.getStats()
        lost = [
            s.fractionLost / 256  # RFC 3550: fixed point, 8 bits
            for s in stats.values()
            if isinstance(s, RTCRemoteInboundRtpStreamStats) and s.kind == "video"
        ]
        if not lost:
            return
        before = session.link.divisor
        session.link = adapt(session.link, max(lost), self._clock())
        session.track.divisor = session.link.divisor
        if session.link.divisor != before:
            log.info(
                "video: link loss %.0f %%: sending every %d camera frame(s)",
                max(lost) * 100,
                session.link.divisor,
            )

    def check_limits(self) -> None:
        """Stop a session that ran too long or that nobody watched for `idle_stop_s`."""
        session = self.session
        if session is None:
            return
        now = self._clock()
        if now - session.started >= self.config.max_duration_s:
            self.stop(f"maximum duration ({self.config.max_duration_s:g} s) reached")
        elif session.viewers == 0 and now - session.last_watched >= self.config.idle_stop_s:
            self.stop(f"nobody watched for {self.config.idle_stop_s:g} s")

    async def run(self) -> None:
        """Enforce the limits once a second until cancelled; then end any session."""
        buffering = asyncio.ensure_future(self.prealarm.run()) if self.prealarm else None
        try:
            while True:
                await asyncio.sleep(1.0)
                self.check_limits()
                try:
                    await self.follow_link()
                except Exception:
                    log.exception("video: reading the link's statistics failed")
        finally:
            session = self.session
            if session is not None:
                with contextlib.suppress(Exception):
                    self._send(Rtc(kind="bye", session=session.id, reason="device stopping"))
                await self._close(session, "device stopping")
            for task in list(self._tasks):
                task.cancel()
            if buffering is not None:
                buffering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await buffering
