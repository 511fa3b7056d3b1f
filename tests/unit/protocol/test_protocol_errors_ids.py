from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from protocol import (
    REASONS,
    BadSignature,
    DeviceId,
    KeyFileMissing,
    Malformed,
    MessageId,
    Oversized,
    ProtocolError,
    Replay,
    Stale,
    TopicMismatch,
    UnknownSigner,
    check_id,
    new_message_id,
)

ERRORS = [
    (Malformed, ValueError, "malformed"),
    (Oversized, ValueError, "oversized"),
    (BadSignature, ValueError, "bad_signature"),
    (UnknownSigner, LookupError, "unknown_signer"),
    (Replay, ValueError, "replay"),
    (Stale, ValueError, "stale"),
    (TopicMismatch, ValueError, "topic_mismatch"),
    (KeyFileMissing, FileNotFoundError, "key_missing"),
]


@pytest.mark.parametrize(("cls", "builtin", "reason"), ERRORS)
def test_errors_carry_reason_and_builtin(
    cls: type[ProtocolError], builtin: type[Exception], reason: str
) -> None:
    err = cls("what failed")
    assert isinstance(err, ProtocolError)
    assert isinstance(err, builtin)
    assert err.reason == reason
    assert reason in REASONS
    assert str(err) == "what failed"


def test_reasons_are_unique_and_include_the_root() -> None:
    assert len(set(REASONS)) == len(REASONS)
    assert ProtocolError.reason in REASONS
    assert all(re.fullmatch(r"[a-z_]+", r) for r in REASONS)


VALID_IDS = ["abc", "bell-0001", "0ab", "a--", "a" * 64, "9" * 3, "gw-seoul-1"]
INVALID_IDS = [
    "",
    "ab",
    "a" * 65,
    "-abc",
    "Bell-1",
    "bell_1",
    "bell 1",
    "bell/1",
    "bell+",
    "bell#",
    "abc\n",
    "\nabc",
    "bél-1",
    "ab\x00c",
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_check_id_accepts(value: str) -> None:
    assert check_id(value) == value
    TypeAdapter(DeviceId).validate_python(value)


@pytest.mark.parametrize("value", INVALID_IDS)
def test_check_id_refuses(value: str) -> None:
    with pytest.raises(Malformed, match="device id"):
        check_id(value)
    with pytest.raises(ValidationError):
        TypeAdapter(DeviceId).validate_python(value)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("ab", "3 to 64 characters"),
        ("a" * 65, "3 to 64 characters"),
        ("Bell-1", "use lowercase"),
        ("-abc", "start with '-'"),
    ],
)
def test_check_id_says_what_is_wrong(value: str, says: str) -> None:
    with pytest.raises(Malformed, match=re.escape(says)):
        check_id(value)


def test_check_id_names_the_field() -> None:
    with pytest.raises(Malformed, match=r"^signer id "):
        check_id("X", "signer id")


def test_check_id_does_not_echo_hostile_input_at_length() -> None:
    hostile = "A" * 10_000
    with pytest.raises(Malformed) as info:
        check_id(hostile)
    assert "A" * 81 not in str(info.value)
    assert len(str(info.value)) < 300


def test_check_id_refuses_non_strings() -> None:
    with pytest.raises(Malformed, match="expected a string"):
        check_id(123)  # type: ignore[arg-type]


@given(st.text(alphabet="ab-Z0_\n", max_size=70))
def test_pydantic_and_check_id_agree(value: str) -> None:
    # two regex engines (Python's re and pydantic's Rust one) must draw the same line
    try:
        check_id(value)
        ours = True
    except Malformed:
        ours = False
    try:
        TypeAdapter(DeviceId).validate_python(value)
        theirs = True
    except ValidationError:
        theirs = False
    assert ours == theirs


def test_new_message_id_is_valid_and_unique() -> None:
    ids = {new_message_id() for _ in range(1000)}
    assert len(ids) == 1000
    adapter = TypeAdapter(MessageId)
    for value in ids:
        adapter.validate_python(value)


@pytest.mark.parametrize("value", ["short", "a" * 65, "has space", "has.dot", "abcdefgh\n"])
def test_message_id_refuses(value: str) -> None:
    with pytest.raises(ValidationError):
        TypeAdapter(MessageId).validate_python(value)


def test_path_ids_are_checked_by_their_own_grammar() -> None:
    from protocol.ids import check_path_id, unchecked_path_params

    assert check_path_id("device_id", "bell-0001") == "bell-0001"
    assert check_path_id("event_id", "0123456789abcdef") == "0123456789abcdef"
    for name, value in [
        ("device_id", "../alerts/0123456789abcdef/closed"),
        ("device_id", "..%2Falerts"),
        ("event_id", "0123456789abcdef/closed"),
        ("event_id", "\uff10" * 10),  # full-width digits
        ("viewer_id", "x" * 65),
        ("device_id", "bell-0001\n"),
    ]:
        with pytest.raises(Malformed, match=name.replace("_", " ")):
            check_path_id(name, value)
    with pytest.raises(KeyError):
        check_path_id("name", "kim")
    assert unchecked_path_params(["device_id", "stage", "file"], also=["stage"]) == ["file"]
