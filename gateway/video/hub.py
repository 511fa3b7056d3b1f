"""The video hub: one aiortc peer per device stream, recorded and relayed to viewers.

Nothing is decoded or re-encoded here. The device's encoded frames are taken from the
receiver (`ansimi.webrtc.tap_encoded`), written as they are to a crash-safe recording (its
disk writes on one thread, `encrypted.DiskThread`, so a stalled disk never stalls the loop)
and pushed straight into each viewer's own `EncodedTrack` (aiortc sends encoded packets
without encoding). That is what lets one process carry dozens of streams (FIELD-NOTES: ~80
relayed pre-encoded streams vs ~32 re-encoded).

Signalling: a device's signed `rtc` offer reaches `on_rtc` after intake has checked it
(signature, known and not revoked device, replay); the answer, or a refusal with a
`reason` and no sdp, goes back signed on the device's `down/rtc` topic. The hub tells the
device how many people watch over a data channel the device opens, so the device can stop
a stream nobody watches.

Several instances: each claims the streams it holds in the store (`claim_stream`, keyed
by its `[video] public_url`). A viewer who reaches an instance that does not hold the
device's stream is relayed: this instance becomes a WHEP viewer of the holder (passing on
the viewer's own bearer token, so the holder checks the same rights) and fans that one
upstream track out to its own viewers as it does a device's, without re-encoding. The
relay ends with its last viewer or with the holder's stream. Sound crosses the relay
too: its upstream session carries one audio section both ways, so a viewer here who holds
push-to-talk is heard at the door (the press is passed on to the holder, which checks the
viewer's token, audits and grants it as for its own viewers), and the door's microphone,
when the device sends it, reaches the listeners here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import (
    MediaStreamTrack,
    RTCDataChannel,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from ansimi.privacy import Keyring
from ansimi.webrtc import (
    EncodedFrame,
    EncodedTrack,
    VideoCodec,
    codec_of,
    enable_loopback_candidates,
    prefer_codecs,
    request_keyframe,
    rtc_configuration,
    tap_encoded,
)
from ansimi.webrtc_audio import TalkTrack
from gateway.errors import GatewayError
from gateway.store import StreamStore
from gateway.video import audit
from gateway.video.config import VideoConfig
from gateway.video.encrypted import SUFFIX as ENCRYPTED
from gateway.video.encrypted import DiskThread, RecordingBroken
from gateway.video.evidence import SEAL_SUFFIX, seal_path, seal_recording
from gateway.video.recorder import Recorder
from gateway.video.retention import sweep
from protocol.ids import new_message_id
from protocol.jws import Signer
from protocol.messages import Rtc

log = logging.getLogger(__name__)

SendRtc = Callable[[str, Rtc], object]
MAX_SDP = 10_000  # the wire contract's bound on Rtc.sdp


class VideoError(GatewayError):
    """Root of the hub's errors; `reason` is terse enough for a wire reply or HTTP body."""

    reason = "video_error"


class DeviceOffline(VideoError, LookupError):
    reason = "device_offline"


class BadOffer(VideoError, ValueError):
    reason = "bad_offer"


class TooManyViewers(VideoError, RuntimeError):
    reason = "too_many_viewers"


class TalkbackOff(VideoError, PermissionError):
    reason = "talkback_off"


class NoSuchViewer(VideoError, LookupError):
    reason = "no_such_viewer"


# The store's record of which instance holds which live stream (gateway/store.py).
StreamHolders = StreamStore


RELAY_TIMEOUT_S = 10.0
# a push-to-talk grant ends by itself after this long: a stuck button or a closed tab must
# not leave a voice channel open into someone's home
TALK_GRANT_S = 30.0


@dataclass(eq=False)
class Viewer:
    id: str
    device_id: str
    pc: RTCPeerConnection
    track: EncodedTrack  # opens at the first keyframe
    answer: str


@dataclass(eq=False)
class Stream:
    device_id: str
    session: str
    pc: RTCPeerConnection
    receiver: RTCRtpReceiver
    codec: VideoCodec
    recorder: Recorder
    viewers: dict[str, Viewer] = field(default_factory=dict)
    channel: RTCDataChannel | None = None
    started: float = field(default_factory=time.monotonic)
    frames: int = 0
    first_frame: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    # a relay of another instance's stream: its WHEP session there, and the viewer's token
    relayed_from: str | None = None
    authorization: str | None = None
    # talk-back: present only if the device offered to receive audio (its talkback is on)
    talk: TalkTrack | None = None
    talker: str | None = None  # the viewer holding push-to-talk
    talk_until: float = 0.0  # monotonic
    # the door's microphone (the device sends audio only when its [video] microphone is on)
    door_audio: bool = False
    listeners: dict[str, TalkTrack] = field(default_factory=dict)  # viewer id -> its audio

    def on_frame(self, frame: EncodedFrame) -> None:
        self.frames += 1
        self.first_frame.set()
        if not self.recorder.closed:
            try:
                self.recorder.write(frame)
            except Exception:
                # a full disk or a muxer error ends this recording, not the live stream
                log.exception("video: recording %s failed; live video goes on", self.device_id)
                with contextlib.suppress(Exception):
                    self.recorder.close()
        for viewer in self.viewers.values():
            viewer.track.push(frame)


class VideoHub:
    def __init__(
        self,
        config: VideoConfig,
        send: SendRtc,
        signer: Signer,
        *,
        keyring: Keyring | None = None,
        holders: StreamHolders | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._send = send
        self._signer = signer
        # recordings are encrypted under the site's data key; without one, live video only
        self._keyring = keyring
        # shared with the other instances only when this one says where it can be reached
        self._holders = holders if config.public_url else None
        self._me = config.public_url.rstrip("/")
        if keyring is None:
            log.warning(
                "video: no data key, so nothing is recorded (video is personal data and is "
                "never stored in clear). Fix: run `ansimi gateway privacy-key init`"
            )
        self._clock = clock
        self._disk = DiskThread()
        self.streams: dict[str, Stream] = {}
        self._viewers: dict[str, Viewer] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: dict[str, int] = {}
        self.sealed: list[Path] = []
        if config.loopback_candidates:
            enable_loopback_candidates()

    # ---- device side ---------------------------------------------------------------

    def on_rtc(self, device_id: str, rtc: Rtc) -> None:
        """Intake calls this, on the loop, for every accepted `rtc` message."""
        task = asyncio.ensure_future(self.handle_rtc(device_id, rtc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def handle_rtc(self, device_id: str, rtc: Rtc) -> None:
        lock = self._locks.setdefault(device_id, asyncio.Lock())
        async with lock:
            try:
                if rtc.kind == "offer":
                    await self._on_offer(device_id, rtc)
                elif rtc.kind == "bye":
                    stream = self.streams.get(device_id)
                    if stream is not None and stream.session == rtc.session:
                        await self._end(stream, f"device said bye: {rtc.reason or 'no reason'}")
                else:
                    log.warning("video: %s sent an rtc answer; devices only offer", device_id)
            except Exception:
                # One device's bad stream must not take the hub (or intake) down.
                log.exception("video: handling rtc %s from %s failed", rtc.kind, device_id)

    def _refuse(self, device_id: str, session: str, reason: str, detail: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.warning("video: refused an offer from %s: %s", device_id, detail)
        self._send(device_id, Rtc(kind="answer", session=session, reason=reason))

    async def _on_offer(self, device_id: str, rtc: Rtc) -> None:
        current = self.streams.get(device_id)
        if current is not None:
            if current.session == rtc.session:
                return  # the same offer again (a resend): it has been answered
            await self._end(current, "replaced by a new offer")
        if len(self.streams) >= self.config.max_streams:
            self._refuse(
                device_id,
                rtc.session,
                f"too many streams: this gateway's cap of {self.config.max_streams} is reached",
                f"{len(self.streams)} streams already",
            )
            return
        assert rtc.sdp is not None  # the model requires an sdp on offers
        pc = RTCPeerConnection(rtc_configuration(self.config.ice_servers))
        # the door's microphone, when the device sends audio (its [video] microphone is on)
        door: list[MediaStreamTrack] = []
        pc.on("track", lambda t: door.append(t) if t.kind == "audio" else None)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(rtc.sdp, "offer"))
            receivers = [t.receiver for t in pc.getTransceivers() if t.kind == "video"]
            if len(receivers) != 1:
                raise ValueError(f"{len(receivers)} video sections; exactly one is expected")
            audio = [t for t in pc.getTransceivers() if t.kind == "audio"]
            if len(audio) > 1:
                raise ValueError(f"{len(audio)} audio sections; at most one is expected")
            talk = None
            offered = _audio_direction(rtc.sdp)
            if audio and offered in ("recvonly", "sendrecv"):
                # the device receives audio only when its talk-back is on: it gets a track
                # that is silent until an operator holds push-to-talk
                talk = TalkTrack()
                audio[0].sender.replaceTrack(talk)
            if audio:
                audio[0].direction = {
                    "sendrecv": "sendrecv",
                    "recvonly": "sendonly",
                    "sendonly": "recvonly",
                }.get(offered or "", "inactive")
            stem = self._recording_stem(device_id, rtc.session)
            stream_box: list[Stream] = []
            tap_encoded(receivers[0], lambda f: stream_box[0].on_frame(f) if stream_box else None)
            await pc.setLocalDescription(await pc.createAnswer())
            answer = pc.localDescription.sdp
            codec = _negotiated_codec(answer)
        except Exception as exc:
            await pc.close()
            self._refuse(device_id, rtc.session, "malformed sdp", f"{type(exc).__name__}: {exc}")
            return
        if len(answer) > MAX_SDP:
            await pc.close()
            self._refuse(device_id, rtc.session, "answer too long", f"{len(answer)} chars")
            return
        stream = Stream(
            device_id,
            rtc.session,
            pc,
            receivers[0],
            codec,
            Recorder(stem, self._keyring, disk=self._disk),
            talk=talk,
        )
        stream_box.append(stream)
        self.streams[device_id] = stream
        if door:
            self._listen_to_door(stream, door[0])

        @pc.on("datachannel")
        def _on_channel(channel: RTCDataChannel) -> None:
            stream.channel = channel
            self._report_viewers(stream)

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not stream.closed:
                await self._end(stream, f"connection {pc.connectionState}")

        if self._holders is not None:
            await self._holders.claim_stream(
                device_id, self._me, rtc.session, int(self._clock() * 1000)
            )
        self._send(device_id, Rtc(kind="answer", session=rtc.session, sdp=answer))
        log.info("video: stream from %s (%s, session %s)", device_id, codec, rtc.session)

    def _recording_stem(self, device_id: str, session: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        return self.config.recordings_dir / device_id / f"{stamp}-{session}"

    async def stop_stream(self, device_id: str, reason: str = "stopped by the gateway") -> bool:
        stream = self.streams.get(device_id)
        if stream is None:
            return False
        self._send(device_id, Rtc(kind="bye", session=stream.session, reason=reason[:200]))
        await self._end(stream, reason)
        return True

    async def _end(self, stream: Stream, why: str) -> None:
        if stream.closed:
            return
        stream.closed = True
        if self.streams.get(stream.device_id) is stream:
            del self.streams[stream.device_id]
        for viewer in list(stream.viewers.values()):
            await self._drop_viewer(viewer)
        if stream.talk is not None:
            stream.talk.stop()
        await stream.pc.close()
        if stream.relayed_from is not None:
            await self._leave_upstream(stream)
            log.info("video: relay of %s ended: %s", stream.device_id, why)
            return
        if self._holders is not None:
            with contextlib.suppress(Exception):  # a stale claim only costs a failed relay
                await self._holders.release_stream(stream.device_id, self._me, stream.session)
        try:
            path = stream.recorder.close()
            await stream.recorder.finished()
        except Exception:
            log.exception("video: finishing the recording of %s failed", stream.device_id)
            path = stream.recorder.path
        log.info(
            "video: stream from %s ended after %d frames: %s",
            stream.device_id,
            stream.frames,
            why,
        )
        if path is not None and path.exists():
            await self._seal(stream, path)

    async def _seal(self, stream: Stream, path: Path) -> None:
        assert self._keyring is not None  # a recording exists only with a data key
        try:
            # hashing a long recording reads it whole: keep the loop free meanwhile
            seal = await asyncio.to_thread(
                seal_recording,
                path,
                self._signer,
                self._keyring,
                device=stream.device_id,
                session=stream.session,
                codec=stream.codec,
                frames=stream.recorder.frames,
                started=stream.recorder.started_at,
                ended=self._clock(),
            )
        except (OSError, RecordingBroken):
            log.exception("video: could not seal %s: it stays unsealed", path)
            return
        self.sealed.append(path)
        log.info("video: sealed %s (%s)", path, seal.name)

    # ---- viewers -------------------------------------------------------------------

    async def add_viewer(
        self,
        device_id: str,
        offer_sdp: str,
        *,
        authorization: str | None = None,
        operator: str = "",
    ) -> Viewer:
        """Answer a viewer's SDP offer with the device's live stream; raises VideoError.

        `authorization` (the viewer's `Authorization` header) is passed on to the instance
        holding the stream when it is not this one.
        """
        stream = self.streams.get(device_id)
        if stream is None:
            lock = self._locks.setdefault(device_id, asyncio.Lock())
            async with lock:  # one relay per device, however many viewers arrive at once
                stream = self.streams.get(device_id) or await self._relay_from_holder(
                    device_id, authorization, operator
                )
        if stream is None:
            raise DeviceOffline(f"device {device_id} has no live stream; send it video_start")
        if len(stream.viewers) >= self.config.max_viewers:
            raise TooManyViewers(
                f"device {device_id} already has {len(stream.viewers)} viewers (the cap)"
            )
        pc = RTCPeerConnection(rtc_configuration(self.config.ice_servers))
        track = EncodedTrack(from_keyframe=True)
        # the viewer's microphone, if its offer sends audio: heard only while it holds
        # push-to-talk (talk()), and drained all the time so nothing piles up
        voices: list[MediaStreamTrack] = []
        pc.on("track", lambda t: voices.append(t) if t.kind == "audio" else None)
        # the door's sound, if the device sends it and the viewer's offer takes audio
        listener = TalkTrack() if stream.door_audio and "m=audio" in offer_sdp else None
        try:
            if listener is not None:
                pc.addTransceiver(listener, direction="sendrecv")
            transceiver = pc.addTransceiver(track, direction="sendonly")
            # the viewer gets the device's own bytes, so it must take the device's codec
            prefer_codecs(transceiver, [stream.codec])
            try:
                await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
                if transceiver.mid is None:
                    raise ValueError("the offer has no video section")
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as exc:
                raise BadOffer(
                    f"viewer offer refused ({type(exc).__name__}: {exc}); it must be a valid "
                    f"SDP offer that can receive {stream.codec} video"
                ) from None
        except BaseException:
            track.stop()
            if listener is not None:
                listener.stop()
            await pc.close()
            raise
        if stream.closed:
            track.stop()
            if listener is not None:
                listener.stop()
            await pc.close()
            raise DeviceOffline(f"device {device_id}'s stream ended meanwhile")
        viewer = Viewer(new_message_id(), device_id, pc, track, pc.localDescription.sdp)
        stream.viewers[viewer.id] = viewer
        self._viewers[viewer.id] = viewer
        for voice in voices:
            self._spawn(self._hear(stream, viewer, voice))
        if listener is not None:
            await asyncio.to_thread(
                audit.append,
                self.config.recordings_dir,
                "listen",
                operator=operator or "unnamed viewer",
                reason="live view with the door's microphone",
                device=device_id,
                viewer=viewer.id,
            )
            stream.listeners[viewer.id] = listener

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._drop_viewer(viewer)

        self._report_viewers(stream)
        # a fresh viewer starts at a keyframe: ask for one instead of waiting for the next
        await request_keyframe(stream.receiver)
        return viewer

    # ---- relays from the instance holding a stream ----------------------------------

    async def _relay_from_holder(
        self, device_id: str, authorization: str | None, operator: str
    ) -> Stream | None:
        """Become a WHEP viewer of the instance holding `device_id`'s stream; None if none."""
        if self._holders is None:
            return None
        holder = await self._holders.stream_holder(device_id)
        if holder is None or holder == self._me:
            return None
        if len(self.streams) >= self.config.max_streams:
            raise TooManyViewers(f"this instance's cap of {self.config.max_streams} streams")
        pc = RTCPeerConnection(rtc_configuration(self.config.ice_servers))
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        # talk-back towards the holder (silent until a viewer here holds push-to-talk), and
        # the door's microphone from it if the device sends one: one audio section
        talk = TalkTrack()
        pc.addTransceiver(talk, direction="sendrecv")
        door: list[MediaStreamTrack] = []
        pc.on("track", lambda t: door.append(t) if t.kind == "audio" else None)
        box: list[Stream] = []
        tap_encoded(receiver, lambda f: box[0].on_frame(f) if box else None)
        headers = {"Content-Type": "application/sdp"}
        if authorization:
            headers["Authorization"] = authorization
        if operator:  # the holder audits who listens to the door through this relay
            headers["X-Ansimi-Operator"] = operator
        try:
            await pc.setLocalDescription(await pc.createOffer())
            async with (
                asyncio.timeout(RELAY_TIMEOUT_S),
                aiohttp.ClientSession() as http,
                http.post(
                    f"{holder}/whep/{device_id}", data=pc.localDescription.sdp, headers=headers
                ) as resp,
            ):
                answer = await resp.text()
                if resp.status != 201:
                    raise DeviceOffline(f"{holder} answered {resp.status}: {answer.strip()}")
                location = resp.headers.get("Location", "")
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            codec = _negotiated_codec(answer)
        except DeviceOffline as exc:
            talk.stop()
            await pc.close()
            log.warning("video: no relay of %s: %s", device_id, exc)
            return None
        except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
            talk.stop()
            await pc.close()
            log.warning("video: no relay of %s from %s: %s", device_id, holder, exc)
            return None
        stream = Stream(
            device_id,
            f"relay-{new_message_id()}",
            pc,
            receiver,
            codec,
            Recorder(Path(), None),  # the holder records; a relay never does
            relayed_from=f"{holder}{location}",
            authorization=authorization,
            talk=talk,
        )
        box.append(stream)
        self.streams[device_id] = stream
        if door:
            self._listen_to_door(stream, door[0])

        @pc.on("connectionstatechange")
        async def _on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not stream.closed:
                await self._end(stream, f"upstream connection {pc.connectionState}")

        log.info("video: relaying %s from %s", device_id, holder)
        return stream

    async def _leave_upstream(self, stream: Stream) -> None:
        with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
            await _upstream("DELETE", str(stream.relayed_from), stream.authorization)

    # ---- talk-back ------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listen_to_door(self, stream: Stream, door: MediaStreamTrack) -> None:
        # set now, not in the task: the viewer that made a relay is added before it runs
        stream.door_audio = True
        self._spawn(self._fan_out_door(stream, door))

    async def _fan_out_door(self, stream: Stream, door: MediaStreamTrack) -> None:
        """The door's microphone to every viewer that listens; read always, so that
        nothing piles up while nobody does."""
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await door.recv()
                for listener in stream.listeners.values():
                    listener.offer(frame)  # type: ignore[arg-type]

    async def _hear(self, stream: Stream, viewer: Viewer, voice: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await voice.recv()
                talk = stream.talk
                if (
                    talk is not None
                    and stream.talker == viewer.id
                    and time.monotonic() < stream.talk_until
                ):
                    talk.offer(frame)  # type: ignore[arg-type]

    async def talk(
        self,
        device_id: str,
        viewer_id: str,
        *,
        on: bool,
        operator: str,
        reason: str,
        authorization: str | None = None,
    ) -> None:
        """Push-to-talk: `viewer_id`'s microphone to the doorbell's speaker, or stop it.

        Each press is audited (operator, reason) before any sound passes. Raises
        DeviceOffline, NoSuchViewer, TalkbackOff (the device has no talk-back). On a relay
        the press goes to the holder first, with the viewer's `authorization`.
        """
        stream = self.streams.get(device_id)
        if stream is None:
            raise DeviceOffline(f"device {device_id} has no live stream")
        if viewer_id not in stream.viewers:
            raise NoSuchViewer(f"viewer {viewer_id} does not watch {device_id}")
        if stream.talk is None:
            raise TalkbackOff(f"device {device_id} has talk-back off (its [video] talkback)")
        if stream.relayed_from is not None:
            await self._talk_upstream(stream, on, operator, reason, authorization)
        if not on:
            if stream.talker == viewer_id:
                stream.talker, stream.talk_until = None, 0.0
            return
        await asyncio.to_thread(
            audit.append,
            self.config.recordings_dir,
            "talkback",
            operator=operator,
            reason=reason,
            device=device_id,
            viewer=viewer_id,
        )
        # one voice at a time: the latest press takes over
        stream.talker, stream.talk_until = viewer_id, time.monotonic() + TALK_GRANT_S
        log.info("video: talk-back to %s opened", device_id)

    async def _talk_upstream(
        self, stream: Stream, on: bool, operator: str, reason: str, authorization: str | None
    ) -> None:
        """Pass a push-to-talk press or release on to the instance holding the stream."""
        url = f"{stream.relayed_from}/talk"
        body = {"on": on, "operator": operator, "reason": reason}
        try:
            status, text = await _upstream("POST", url, authorization, body)
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            if not on:
                return  # a release that does not arrive lapses there by itself
            raise DeviceOffline(f"the holder of {stream.device_id} did not answer: {exc}") from None
        if status == 409:
            raise TalkbackOff(f"device {stream.device_id} has talk-back off (its holder says)")
        if status != 200 and on:
            log.warning("video: holder refused talk-back to %s: %s", stream.device_id, status)
            raise DeviceOffline(f"the holder of {stream.device_id} answered {status}: {text}")

    async def remove_viewer(self, viewer_id: str, device_id: str | None = None) -> bool:
        viewer = self._viewers.get(viewer_id)
        if viewer is None or (device_id is not None and viewer.device_id != device_id):
            return False
        await self._drop_viewer(viewer)
        return True

    async def _drop_viewer(self, viewer: Viewer) -> None:
        if self._viewers.pop(viewer.id, None) is None:
            return
        stream = self.streams.get(viewer.device_id)
        if stream is not None:
            stream.viewers.pop(viewer.id, None)
            listener = stream.listeners.pop(viewer.id, None)
            if listener is not None:
                listener.stop()
            self._report_viewers(stream)
        viewer.track.stop()
        await viewer.pc.close()
        if stream is not None and stream.relayed_from is not None and not stream.viewers:
            await self._end(stream, "its last viewer left")

    def _report_viewers(self, stream: Stream) -> None:
        channel = stream.channel
        if channel is not None and channel.readyState == "open":
            channel.send(json.dumps({"viewers": len(stream.viewers)}))

    # ---- housekeeping --------------------------------------------------------------

    def sweep_recordings(self) -> list[Path]:
        """Delete recordings (and seals) past retention, except held ones; returns them."""
        return sweep(
            self.config.recordings_dir,
            self.config.retention_days,
            self._clock(),
            active=self._active(),
        )

    def seal_orphans(self) -> list[Path]:
        """Seal recordings a crash left unsealed (as far as they read; `complete` false).

        Run before any stream starts: every unsealed recording then belongs to a dead
        process. One that does not open at all is logged and left for an operator.
        """
        root = self.config.recordings_dir
        if self._keyring is None or not root.is_dir():
            return []
        done = []
        for path in sorted(root.glob(f"*/*{ENCRYPTED}")):
            if seal_path(path).exists() or path in self._active():
                continue
            try:
                seal_recording(
                    path,
                    self._signer,
                    self._keyring,
                    device=path.parent.name,
                    recovered_after_crash=True,
                    ended=path.stat().st_mtime,
                )
            except (OSError, RecordingBroken):
                log.exception("video: cannot seal the recording %s left by a crash", path)
                continue
            log.warning("video: sealed %s, left unfinished by a crash", path)
            done.append(path)
        return done

    def _active(self) -> set[Path | None]:
        return {s.recorder.path for s in self.streams.values()}

    async def run(self) -> None:
        """Periodic work (viewer reports, retention) until cancelled; then close all."""
        last_sweep = 0.0
        try:
            if self._holders is not None:
                # whatever this instance held before a crash died with it
                await self._holders.release_streams_of(self._me)
            self.sealed.extend(await asyncio.to_thread(self.seal_orphans))
            while True:
                await asyncio.sleep(self.config.watch_report_s)
                for stream in list(self.streams.values()):
                    self._report_viewers(stream)
                if time.monotonic() - last_sweep > 3600:
                    last_sweep = time.monotonic()
                    await asyncio.to_thread(self.sweep_recordings)
        finally:
            await self.close()

    async def close(self) -> None:
        for stream in list(self.streams.values()):
            with contextlib.suppress(Exception):
                self._send(
                    stream.device_id,
                    Rtc(kind="bye", session=stream.session, reason="gateway stopping"),
                )
            await self._end(stream, "gateway stopping")
        self._disk.stop()
        for task in list(self._tasks):
            task.cancel()

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self.streams),
            "viewers": len(self._viewers),
            "refused": dict(self.refused),
            "sealed": len(self.sealed),
            "recordings_cut_short_by_disk": self._disk.overflows,
        }


async def _upstream(
    method: str, url: str, authorization: str | None, body: dict[str, Any] | None = None
) -> tuple[int, str]:
    """One request to the instance holding a relayed stream: (status, body text)."""
    headers = {"Authorization": authorization} if authorization else {}
    async with (
        asyncio.timeout(RELAY_TIMEOUT_S),
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=headers, json=body) as resp,
    ):
        return resp.status, (await resp.text()).strip()


def _audio_direction(sdp: str) -> str | None:
    """The direction of the offer's audio section (from the offerer's side), if it has one."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "audio":
            return media.direction
    return None


def _negotiated_codec(answer_sdp: str) -> VideoCodec:
    for media in SessionDescription.parse(answer_sdp).media:
        for codec in media.rtp.codecs:
            found = codec_of(codec.mimeType)
            if found is not None:
                return found
    raise ValueError("no H264 or VP8 in the negotiated answer")


__all__ = [
    "SEAL_SUFFIX",
    "BadOffer",
    "DeviceOffline",
    "Stream",
    "TooManyViewers",
    "VideoError",
    "VideoHub",
    "Viewer",
]
