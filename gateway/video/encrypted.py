"""Recordings encrypted at rest, in chunks, under the site's data key.

Video of a victim's doorway is personal data, so no recording is ever on disk in clear.
The muxer writes into a `ChunkWriter` instead of a file; every cut (about a second of
video, see the recorder) becomes one AES-256-GCM chunk appended to `<recording>.enc`:

```
MAGIC                                   b"ANSIMI-VIDEO-1\\n"
u32 big-endian length, header JSON      {"v":1,"recording":NAME,"codec":..,"kid":..,"key":..}
chunks, each: u32 length, u8 final flag, nonce (12) || ciphertext || tag (16)
```

Each recording has its own random content key, stored in the header wrapped (AES-GCM)
under the site data key `kid` (ansimi/privacy.py). Key rotation re-wraps that one field and
never touches the chunks (`rewrap`). Each chunk's associated data binds it to the recording
name, its index and whether it is the last, so chunks cannot be reordered, moved to another
recording, or the end faked. A crash mid-recording leaves every chunk written before it
whole and readable (`open_chunks` stops at a torn tail and says the file is incomplete).

The seal (evidence.py) covers the SHA-256 of the chunk section (the ciphertext, header
excluded so that rotation keeps the seal valid) and of the plaintext the chunks decrypt to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ansimi.privacy import Keyring, SealError
from gateway.errors import GatewayError

log = logging.getLogger(__name__)
MAGIC: Final = b"ANSIMI-VIDEO-1\n"
SUFFIX: Final = ".enc"
NONCE: Final = 12
TAG: Final = 16
# a chunk this large is cut even if no cut was asked for (a muxer writing a long burst)
MAX_CHUNK: Final = 4 << 20
_LENGTH = struct.Struct(">I")
_RECORD = struct.Struct(">IB")
# encrypted bytes waiting for the disk at most (all recordings together): past that the
# disk does not keep up, and a recording that needs more is ended (incomplete) instead
MAX_BACKLOG: Final = 64 << 20


class RecordingBroken(GatewayError, ValueError):
    """An encrypted recording cannot be opened as written: altered, moved or unreadable."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _key_place(recording: str) -> dict[str, str]:
    # the content key is bound to its recording: a header copied onto another file fails
    return {"table": "recordings", "column": "content_key", "row": recording}


def _chunk_aad(recording: str, index: int, final: bool) -> bytes:
    return json.dumps(["ansimi-video-1", recording, index, final], separators=(",", ":")).encode()


def _wrap(keyring: Keyring, content_key: bytes, recording: str) -> dict[str, str]:
    return {
        "kid": keyring.current.kid,
        "key": keyring.seal(_b64(content_key), **_key_place(recording)),
    }


def _header_bytes(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + _LENGTH.pack(len(body)) + body


class DiskThread:
    """Appends encrypted chunks to recording files on one thread, off the event loop.

    Muxing and encryption stay on the loop (tens of microseconds a frame; AES-GCM releases
    the GIL); only the file writes, flushes and the final fsync move here, once a chunk
    (about a second of a stream): a disk that stalls (a full page cache on an SD card)
    stalls the recordings, never the live video, signalling or intake sharing the loop.
    One thread and one queue keep each file's writes in order.
    """

    def __init__(self, max_backlog: int = MAX_BACKLOG) -> None:
        self._jobs: queue.SimpleQueue[tuple[IO[bytes], bytes | Future[None], bool] | None]
        self._jobs = queue.SimpleQueue()
        self._max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        # bytes handed over (counted on the loop) and written (counted by the thread): one
        # writer each, so their difference needs no lock
        self._sent = 0
        self._written = 0
        self.overflows = 0  # recordings ended because the disk fell behind

    def append(self, file: IO[bytes], data: bytes) -> bool:
        """Queue `data` for `file`; False (nothing queued) when the backlog is full."""
        if self._sent - self._written + len(data) > self._max_backlog:
            self.overflows += 1
            return False
        self._sent += len(data)
        self._put((file, data, False))
        return True

    def finish(self, file: IO[bytes], *, sync: bool) -> Future[None]:
        """Close `file` after what was queued for it (fsync first if `sync`)."""
        done: Future[None] = Future()
        self._put((file, done, sync))
        return done

    def stop(self) -> None:
        """Let the thread end once it has written what is queued."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _put(self, job: tuple[IO[bytes], bytes | Future[None], bool]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="video-disk", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        failed: set[int] = set()  # files whose write failed: the rest of theirs is skipped
        while (job := self._jobs.get()) is not None:
            file, item, sync = job
            if isinstance(item, Future):
                _close_file(file, sync and id(file) not in failed, item)
                failed.discard(id(file))
                continue
            try:
                if id(file) not in failed:
                    file.write(item)
                    file.flush()
            except OSError:
                # a full disk ends this recording (it reads as incomplete), not the others
                log.exception("video: writing the recording %s failed", file.name)
                failed.add(id(file))
            finally:
                self._written += len(item)


def _close_file(file: IO[bytes], sync: bool, done: Future[None]) -> None:
    # closed even if nobody waits any more (the gateway stopping): the file stays whole
    waited = done.set_running_or_notify_cancel()
    try:
        try:
            if sync:
                os.fsync(file.fileno())
        finally:
            file.close()
    except OSError as exc:
        if waited:
            done.set_exception(exc)
        else:
            log.exception("video: closing the recording %s failed", file.name)
    else:
        if waited:
            done.set_result(None)


class ChunkWriter:
    """A write-only file for the muxer: buffers, and on `cut()` appends one encrypted chunk.

    Not seekable on purpose: PyAV then writes the container front to back (fragmented MP4,
    live WebM), which is what lets each chunk be final the moment it is written.

    With a `disk` thread the file writes happen there; `finished` is then done once the
    file is closed (and, after `close()`, synced).
    """

    def __init__(
        self,
        path: Path,
        keyring: Keyring,
        *,
        recording: str,
        codec: str,
        disk: DiskThread | None = None,
    ) -> None:
        self.path = path
        self._disk = disk
        self.finished: Future[None] | None = None
        self.recording = recording
        content_key = AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(content_key)
        header = {"v": 1, "recording": recording, "codec": codec}
        header |= _wrap(keyring, content_key, recording)
        self._buffer = bytearray()
        self.chunks = 0
        self.closed = False
        self._ciphertext = hashlib.sha256()
        self._plaintext = hashlib.sha256()
        path.parent.mkdir(parents=True, exist_ok=True)
        # exclusive: two streams never share a file, and an existing recording is never reset
        self._file: IO[bytes] = path.open("xb")
        self._emit(_header_bytes(header))

    def _emit(self, data: bytes) -> None:
        if self._disk is None:
            self._file.write(data)
            self._file.flush()
        elif not self._disk.append(self._file, data):
            raise OSError(
                f"{self.path}: the disk does not keep up with the recordings ({MAX_BACKLOG >> 20}"
                " MB waiting); this recording ends here. Fix: faster storage, or a lower "
                "[video] max_streams"
            )

    # the file protocol PyAV uses
    def write(self, data: bytes) -> int:
        self._buffer += data
        if len(self._buffer) >= MAX_CHUNK:
            self.cut()
        return len(data)

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        """PyAV flushes after each packet; chunks are cut by the recorder, not here."""

    def cut(self, *, final: bool = False) -> None:
        """Encrypt what was written since the last cut and hand it to the OS."""
        if self.closed or (not self._buffer and not final):
            return
        plaintext = bytes(self._buffer)
        self._buffer.clear()
        nonce = os.urandom(NONCE)
        body = nonce + self._aead.encrypt(
            nonce, plaintext, _chunk_aad(self.recording, self.chunks, final)
        )
        record = _RECORD.pack(len(body), int(final)) + body
        self._emit(record)
        self._ciphertext.update(record)
        self._plaintext.update(plaintext)
        self.chunks += 1

    def close(self) -> None:
        """Write the final chunk (possibly empty) and fsync: the file is complete."""
        if self.closed:
            return
        try:
            self.cut(final=True)
        except BaseException:
            self.abandon()
            raise
        self.closed = True
        self._end_file(sync=True)

    def abandon(self) -> None:
        """Close without the final chunk (the recording failed): it reads as incomplete."""
        if not self.closed:
            self.closed = True
            self._end_file(sync=False)

    def _end_file(self, *, sync: bool) -> None:
        if self._disk is not None:
            self.finished = self._disk.finish(self._file, sync=sync)
            return
        try:
            if sync:
                os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def digests(self) -> tuple[str, str]:
        """(ciphertext sha256 of the chunk section, plaintext sha256), as written so far."""
        return self._ciphertext.hexdigest(), self._plaintext.hexdigest()


@dataclass
class Opened:
    """What reading an encrypted recording found; filled in as its chunks are read."""

    recording: str
    codec: str
    kid: str
    chunks: int = 0
    complete: bool = False  # the final chunk was found: the recording was closed properly
    ciphertext_sha256: str = ""
    plaintext_sha256: str = ""
    plaintext_size: int = 0


def _read_header(f: IO[bytes], where: Path) -> tuple[dict[str, Any], int]:
    if f.read(len(MAGIC)) != MAGIC:
        raise RecordingBroken(f"{where}: not an ansimi encrypted recording (bad magic)")
    raw = f.read(_LENGTH.size)
    if len(raw) != _LENGTH.size:
        raise RecordingBroken(f"{where}: header cut short")
    (length,) = _LENGTH.unpack(raw)
    try:
        header = json.loads(f.read(length))
        if not isinstance(header, dict) or header.get("v") != 1:
            raise ValueError("unknown version")
        for name in ("recording", "codec", "kid", "key"):
            if not isinstance(header.get(name), str):
                raise ValueError(f"no {name}")
    except ValueError as exc:
        raise RecordingBroken(f"{where}: unreadable header ({exc})") from None
    return header, len(MAGIC) + _LENGTH.size + length


def _content_key(header: dict[str, Any], keyring: Keyring, where: Path) -> bytes:
    try:
        key = _unb64(keyring.open(header["key"], **_key_place(header["recording"])))
    except (SealError, binascii.Error, ValueError) as exc:
        raise RecordingBroken(f"{where}: content key does not open: {exc}") from None
    if len(key) != 32:
        raise RecordingBroken(f"{where}: content key has {len(key)} bytes, not 32")
    return key


def open_chunks(
    path: Path, keyring: Keyring, opened: list[Opened] | None = None
) -> Generator[bytes, None, None]:
    """Decrypt `path` chunk by chunk, yielding plaintext; raises RecordingBroken.

    A torn last record (a crash while writing it) ends the iteration quietly, with
    `complete` False in the `Opened` appended to `opened`; anything else that does not
    authenticate raises. The caller decides whether incomplete is acceptable.
    """
    with path.open("rb") as f:
        header, _ = _read_header(f, path)
        info = Opened(header["recording"], header["codec"], header["kid"])
        if opened is not None:
            opened.append(info)
        aead = AESGCM(_content_key(header, keyring, path))
        ciphertext, plaintext = hashlib.sha256(), hashlib.sha256()
        while True:
            prefix = f.read(_RECORD.size)
            if not prefix:
                break
            if len(prefix) < _RECORD.size:
                break  # torn tail
            length, flag = _RECORD.unpack(prefix)
            if flag not in (0, 1) or length < NONCE + TAG or length > MAX_CHUNK + NONCE + TAG:
                raise RecordingBroken(f"{path}: chunk {info.chunks} has a malformed header")
            body = f.read(length)
            if len(body) < length:
                break  # torn tail
            if info.complete:
                raise RecordingBroken(f"{path}: data after the final chunk")
            try:
                data = aead.decrypt(
                    body[:NONCE], body[NONCE:], _chunk_aad(info.recording, info.chunks, flag == 1)
                )
            except InvalidTag:
                raise RecordingBroken(
                    f"{path}: chunk {info.chunks} fails authentication (altered or moved)"
                ) from None
            ciphertext.update(prefix + body)
            plaintext.update(data)
            info.chunks += 1
            info.complete = flag == 1
            info.plaintext_size += len(data)
            info.ciphertext_sha256 = ciphertext.hexdigest()
            info.plaintext_sha256 = plaintext.hexdigest()
            if data:
                yield data
        if info.chunks == 0:
            info.ciphertext_sha256 = ciphertext.hexdigest()
            info.plaintext_sha256 = plaintext.hexdigest()


def decrypt_to(path: Path, keyring: Keyring, target: IO[bytes]) -> Opened:
    """Write the plaintext of `path` to `target`; returns what was found."""
    found: list[Opened] = []
    for data in open_chunks(path, keyring, found):
        target.write(data)
    return found[0]


def check(path: Path, keyring: Keyring) -> Opened:
    """Authenticate every chunk and compute both digests, without keeping the plaintext."""
    found: list[Opened] = []
    for _ in open_chunks(path, keyring, found):
        pass
    return found[0]


def rewrap(path: Path, keyring: Keyring) -> bool:
    """Wrap the content key of `path` under `keyring`'s current key (for rotation).

    Only the header changes; the chunks are copied as they are, into a temporary file that
    replaces the original once whole, so a crash leaves the old or the new file, never half.
    Returns False if the key was already the current one.
    """
    with path.open("rb") as f:
        header, offset = _read_header(f, path)
        if header["kid"] == keyring.current.kid:
            return False
        content_key = _content_key(header, keyring, path)
        header |= _wrap(keyring, content_key, header["recording"])
        tmp = path.with_name(path.name + ".rewrap")
        with tmp.open("wb") as out:
            out.write(_header_bytes(header))
            f.seek(offset)
            while block := f.read(1 << 20):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)
    return True


def rewrap_all(root: Path, keyring: Keyring) -> int:
    """Rewrap every encrypted recording under `root`; returns how many changed."""
    if not root.is_dir():
        return 0
    return sum(rewrap(p, keyring) for p in sorted(root.glob(f"*/*{SUFFIX}")))
