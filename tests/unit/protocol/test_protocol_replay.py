from __future__ import annotations

import pytest

from protocol import (
    DEFAULT_WINDOW_MS,
    Replay,
    Stale,
    check_fresh,
    check_sequence,
    clock_skew_ms,
    sync_next_seq,
)

NOW = 1_732_460_000_000
W = 300_000


@pytest.mark.parametrize(
    ("high_water", "seq", "ts", "window"),
    [
        (None, 0, NOW, W),  # first message ever from this signer
        (None, 2**63 - 1, NOW, W),
        (5, 6, NOW, W),
        (5, 1_000_000, NOW, W),  # gaps are fine: lost messages are not replays
        (0, 1, NOW, W),
        (None, 0, NOW - W, W),  # exactly on the edge of the window, both sides
        (None, 0, NOW + W, W),
        (None, 0, NOW, 0),
        (None, 0, 0, NOW),
    ],
)
def test_fresh(high_water: int | None, seq: int, ts: int, window: int) -> None:
    check_fresh(high_water, seq, ts, NOW, window)


@pytest.mark.parametrize(
    ("high_water", "seq"),
    [(5, 5), (5, 4), (5, 0), (0, 0), (2**63 - 1, 2**63 - 1)],
)
def test_replay(high_water: int, seq: int) -> None:
    with pytest.raises(Replay) as info:
        check_fresh(high_water, seq, NOW, NOW, W)
    assert f"sequence number {seq} " in str(info.value)
    assert f"high-water mark {high_water}" in str(info.value)


@pytest.mark.parametrize(
    ("ts", "window", "says"),
    [
        (NOW - W - 1, W, "300.0 s behind"),
        (NOW + W + 1, W, "300.0 s ahead of"),
        (NOW + 1, 0, "0.0 s ahead of"),
        (0, W, "behind"),
        (NOW + 3_600_000, W, "3600.0 s ahead of"),
    ],
)
def test_stale(ts: int, window: int, says: str) -> None:
    with pytest.raises(Stale) as info:
        check_fresh(None, 0, ts, NOW, window)
    assert says in str(info.value)
    assert "NTP" in str(info.value)


def test_replay_is_reported_before_staleness() -> None:
    with pytest.raises(Replay):
        check_fresh(5, 5, 0, NOW, W)


def test_default_window_is_five_minutes() -> None:
    assert DEFAULT_WINDOW_MS == 5 * 60 * 1000


@pytest.mark.parametrize(
    ("ts", "skew"),
    [
        (NOW, None),
        (NOW - W, None),  # on the edge: inside
        (NOW + W, None),
        (NOW + W + 1, W + 1),  # ahead: positive
        (NOW - 600_000, -600_000),  # ten minutes behind
    ],
)
def test_a_skew_is_measured_only_outside_the_window(ts: int, skew: int | None) -> None:
    assert clock_skew_ms(ts, NOW, W) == skew


def test_the_sequence_alone_decides_a_replay_whatever_the_clock() -> None:
    # rule 2: a fresh number with a wrong clock is not refused by the sequence check...
    check_sequence(5, 6)
    assert clock_skew_ms(0, NOW, W) == -NOW
    # ...and a replayed number is refused however good its timestamp
    with pytest.raises(Replay):
        check_sequence(5, 5)


def test_a_sync_asks_for_the_first_number_the_receiver_accepts() -> None:
    high_water = 41
    check_sequence(high_water, sync_next_seq(high_water))
    with pytest.raises(Replay):
        check_sequence(high_water, sync_next_seq(high_water) - 1)
