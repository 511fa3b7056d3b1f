"""Freshness rules: the sequence number refuses replays; the clock only flags.

Pure: the caller owns the high-water mark and passes the clock in, so tests need no sleeps.
Telling an exact duplicate (re-ack it) from a replay is the caller's job, before calling this.

The rule, part of the wire contract:

1. **Replay protection rests on the sequence number.** A receiver keeps, per signer and
   device, the highest sequence number it accepted (the high-water mark, persisted; the
   gateway keeps it across restarts and key rotations). A message at or below it is a replay
   and is refused (`check_sequence`), unless it is an exact duplicate of something kept
   (the gateway re-acks those).
2. **An uplink timestamp outside the window flags, it never refuses.** A verified device
   message with a fresh sequence number whose `ts` is more than the window (default 300 s)
   from the gateway's clock is kept and forwarded like any other, flagged with its skew
   (`clock_skew_ms`, in the delivery's metadata, never in the signed payload), and answered
   with a `sync`. A bell whose clock is wrong must still reach the centre: a wrong clock is
   a fault to report, not a reason to drop an alarm. Replay protection does not need the
   window, because of rule 1. The window still bounds a last will (`status` offline) from
   the future, and commands to a device (rule 4).
3. **`sync` repairs the device's clock and counter.** When the gateway gets a verified
   message whose timestamp is outside the window (`reason` "clock"), or refuses one as a
   replay with a sequence number *below* the high-water mark that is not an exact duplicate
   (`reason` "sequence": the device lost its counter, e.g. an outbox emptied, reset, moved
   aside or a new key on new hardware), it answers with a signed `sync`
   `{ref: <that message's id>, reason, next_seq: high-water mark + 1}`, at most one per device
   every few seconds and per slot (clock; sequence dated inside the window; sequence dated
   outside it), so that replaying old messages cannot make it flood a bell, nor use up the
   sync a bell that lost its counter or its clock needs. The
   envelope's `ts` is the gateway's clock. The device takes a sync whatever its own clock
   says, provided it is signed by its gateway, addressed to it, above its downlink
   high-water mark and `ref` names a message the device itself sent recently: an old sync
   names an id the device no longer remembers and a number below its high-water mark, so it
   cannot be replayed against it. The device then (a) corrects its clock *offset* to the
   gateway's time (it never sets the system clock) and reports a `health` event
   `clock_corrected` when the skew was the cause or exceeded the window, (b) raises its
   sequence counter to at least `next_seq` and persists that before using it, and (c) signs
   every message still waiting in its outbox again, with the corrected time and new
   numbers, and resends it.
   A bell that lost its counter therefore gets its alert through within one round trip.
4. **Downlink.** A device refuses a gateway message at or below its downlink high-water mark.
   Acks and syncs name a message the device made (`ref`), so they need no window; commands
   and rtc answers must also be inside the window of the device's corrected clock
   (`check_fresh`), so that a command captured long ago cannot be played to a device that
   lost its downlink high-water mark.
"""

from __future__ import annotations

from typing import Final

from protocol.errors import Replay, Stale

DEFAULT_WINDOW_MS: Final = 300_000


def check_sequence(high_water: int | None, seq: int) -> None:
    """Refuse a sequence number at or below the high-water mark (rule 1)."""
    if high_water is not None and seq <= high_water:
        raise Replay(
            f"sequence number {seq} is not above the high-water mark {high_water}: "
            "a replay, or a device that lost its sequence counter"
        )


def clock_skew_ms(ts_ms: int, now_ms: int, window_ms: int) -> int | None:
    """How far `ts_ms` is from the receiver's clock (positive: ahead), when outside the
    window; None inside it (rule 2: a skew flags a message, it does not refuse it)."""
    skew = ts_ms - now_ms
    return skew if abs(skew) > window_ms else None


def check_window(ts_ms: int, now_ms: int, window_ms: int) -> None:
    """Refuse a timestamp outside the window, for what rule 2 does not cover."""
    skew = clock_skew_ms(ts_ms, now_ms, window_ms)
    if skew is not None:
        side = "ahead of" if skew > 0 else "behind"
        raise Stale(
            f"timestamp is {abs(skew) / 1000:.1f} s {side} this clock, outside the "
            f"{window_ms / 1000:g} s window: check the device clock (NTP) and this one"
        )


def check_fresh(high_water: int | None, seq: int, ts_ms: int, now_ms: int, window_ms: int) -> None:
    """Both checks, sequence first: for downlink commands (rule 4)."""
    check_sequence(high_water, seq)
    check_window(ts_ms, now_ms, window_ms)


def sync_next_seq(high_water: int) -> int:
    """The `next_seq` a sync carries: the first number the receiver would accept."""
    return high_water + 1
