"""Field encryption: round trip, tamper, moved ciphertexts, key files, rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansimi.privacy import (
    DataKey,
    KeyFileError,
    Keyring,
    SealError,
    create_key_file,
    load_keyring,
    rotate,
)

PLACE = {"table": "device_private", "column": "address", "row": "bell-0042"}


@pytest.fixture
def ring() -> Keyring:
    return Keyring([DataKey.generate()])


@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    ring = Keyring([DataKey(kid="k1", key=b"\x01" * 32)])
    assert ring.open(ring.seal(text, **PLACE), **PLACE) == text


def test_sealed_value_hides_plaintext_and_differs_each_time(ring: Keyring) -> None:
    one = ring.seal("12 Hidden-ro, 3F", **PLACE)
    two = ring.seal("12 Hidden-ro, 3F", **PLACE)
    assert "Hidden" not in one
    assert one != two  # a fresh nonce per seal
    assert one.startswith(f"v1.{ring.current.kid}.")


def test_a_flipped_byte_fails(ring: Keyring) -> None:
    sealed = ring.seal("+821012345678", **PLACE)
    head, body = sealed.rsplit(".", 1)
    for index in (0, len(body) // 2, len(body) - 2):
        flipped = body[:index] + ("A" if body[index] != "A" else "B") + body[index + 1 :]
        with pytest.raises(SealError, match="authentication failed"):
            ring.open(f"{head}.{flipped}", **PLACE)


def test_a_ciphertext_moved_to_another_row_or_field_fails(ring: Keyring) -> None:
    sealed = ring.seal("12 Hidden-ro", **PLACE)
    with pytest.raises(SealError, match="another row"):
        ring.open(sealed, **{**PLACE, "row": "bell-0043"})
    with pytest.raises(SealError):
        ring.open(sealed, **{**PLACE, "column": "notes"})
    with pytest.raises(SealError):
        ring.open(sealed, **{**PLACE, "table": "other"})


def test_unknown_key_id_names_the_keyring(ring: Keyring) -> None:
    other = Keyring([DataKey.generate()], source="/etc/x.key")
    with pytest.raises(SealError, match=r"does not hold"):
        other.open(ring.seal("x", **PLACE), **PLACE)
    with pytest.raises(SealError, match="not a sealed value"):
        ring.open("plain text", **PLACE)


def test_key_file_is_created_0600_and_loaded(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    made = create_key_file(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded = load_keyring(path)
    assert loaded.current == made.current
    with pytest.raises(KeyFileError, match="already exists"):
        create_key_file(path)


def test_key_file_readable_by_others_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=rf"chmod 600 {path}"):
        load_keyring(path)


def test_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"no data key at .*privacy-key init"):
        load_keyring(tmp_path / "nope.key")


def test_malformed_key_file_does_not_quote_the_secret(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    path.write_text("k1 c2VjcmV0LXNob3J0\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="line 1") as caught:
        load_keyring(path)
    assert "c2VjcmV0" not in str(caught.value)


def test_systemd_credential_wins_over_the_key_file(tmp_path: Path) -> None:
    credentials = tmp_path / "creds"
    credentials.mkdir()
    ring = create_key_file(credentials / "privacy-key")
    os.chmod(credentials / "privacy-key", 0o400)
    loaded = load_keyring(
        tmp_path / "absent.key",
        credential="privacy-key",
        env={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    assert loaded.current == ring.current
    with pytest.raises(KeyFileError, match="read-only"):
        rotate(
            tmp_path / "absent.key",
            lambda _ring: 0,
            credential="privacy-key",
            env={"CREDENTIALS_DIRECTORY": str(credentials)},
        )


def test_rotation_reseals_everything_and_retires_the_old_key(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    old = create_key_file(path)
    rows = {
        f"bell-{n}": old.seal(f"address {n}", **{**PLACE, "row": f"bell-{n}"}) for n in range(5)
    }

    def reseal(ring: Keyring) -> int:
        for row, sealed in rows.items():
            place = {**PLACE, "row": row}
            rows[row] = ring.seal(ring.open(sealed, **place), **place)
        return len(rows)

    kid, count = rotate(path, reseal)
    assert count == 5
    new = load_keyring(path)
    assert [k.kid for k in new.keys] == [kid] and kid != old.current.kid
    for row, sealed in rows.items():
        assert new.kid_of(sealed) == kid
        assert new.open(sealed, **{**PLACE, "row": row}) == f"address {row.split('-')[1]}"
    with pytest.raises(SealError):
        old.open(rows["bell-0"], **{**PLACE, "row": "bell-0"})


def test_rotation_that_fails_half_way_keeps_both_keys(tmp_path: Path) -> None:
    path = tmp_path / "privacy.key"
    old = create_key_file(path)
    sealed = old.seal("x", **PLACE)

    def broken(ring: Keyring) -> int:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        rotate(path, broken)
    ring = load_keyring(path)
    assert len(ring.keys) == 2
    assert ring.open(sealed, **PLACE) == "x"  # old data stays readable
