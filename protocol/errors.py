"""Why a message was refused, as exceptions that carry a machine-readable reason.

Each class also inherits the builtin a caller would naturally catch (``ValueError`` for bad
input, ``LookupError`` for an unknown signer, ``FileNotFoundError`` for a missing key file),
so code that knows nothing of this package still handles them sensibly.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error this package raises on purpose.

    ``reason`` is a short stable token for metrics labels and terse wire replies; the message
    text is for the local log and says what failed and what to do about it.
    """

    reason: str = "protocol_error"


class Malformed(ProtocolError, ValueError):
    reason = "malformed"


class Oversized(ProtocolError, ValueError):
    reason = "oversized"


class BadSignature(ProtocolError, ValueError):
    reason = "bad_signature"


class UnknownSigner(ProtocolError, LookupError):
    reason = "unknown_signer"


class Replay(ProtocolError, ValueError):
    reason = "replay"


class Stale(ProtocolError, ValueError):
    reason = "stale"


class TopicMismatch(ProtocolError, ValueError):
    reason = "topic_mismatch"


class KeyFileMissing(ProtocolError, FileNotFoundError):
    reason = "key_missing"


REASONS: tuple[str, ...] = (
    ProtocolError.reason,
    Malformed.reason,
    Oversized.reason,
    BadSignature.reason,
    UnknownSigner.reason,
    Replay.reason,
    Stale.reason,
    TopicMismatch.reason,
    KeyFileMissing.reason,
)


def clip(value: object, limit: int = 80) -> str:
    """``repr`` of hostile input, cut short so a log line stays a line."""
    if isinstance(value, str | bytes) and len(value) > limit:
        # cut before repr so a 16 KiB string is not rendered in full just to be thrown away
        value = value[:limit]
    text = repr(value)
    if len(text) <= limit:
        return text
    return text[: limit - 3] + "..."
