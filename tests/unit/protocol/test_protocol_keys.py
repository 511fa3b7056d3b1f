from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import (
    KeyFileMissing,
    Malformed,
    ProtocolError,
    Signer,
    generate_key,
    load_private_key,
    private_key_from_pem,
    private_key_to_pem,
    public_key_from_b64,
    public_key_to_b64,
    save_private_key,
    verify,
)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes_raw()


def test_generate_gives_distinct_keys() -> None:
    assert raw(generate_key()) != raw(generate_key())


def test_pem_round_trip() -> None:
    key = generate_key()
    pem = private_key_to_pem(key)
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert raw(private_key_from_pem(pem)) == raw(key)


def test_pem_refuses_other_keys() -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(Malformed, match="not an Ed25519"):
        private_key_from_pem(ec_pem)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        generate_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        generate_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    ],
)
def test_pem_refuses_garbage(data: bytes) -> None:
    with pytest.raises(Malformed):
        private_key_from_pem(data)


def test_public_key_b64_round_trip() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    text = public_key_to_b64(key.public_key())
    assert len(text) == 43
    assert "=" not in text
    # pinned: the registry format must never drift (this is the all-zero seed's key)
    assert text == "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik"
    assert public_key_from_b64(text) == key.public_key()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2i",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2il",  # same bytes, non-canonical last char
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2i+",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2i!",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2é",
        "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik\n",
        " O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2i",
    ],
)
def test_public_key_b64_refuses(text: str) -> None:
    with pytest.raises(Malformed):
        public_key_from_b64(text)


def test_save_and_load(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "device.key"
    save_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert raw(load_private_key(path)) == raw(key)
    assert raw(load_private_key(str(path))) == raw(key)
    assert os.listdir(tmp_path) == ["device.key"]  # no temporary file left behind


def test_save_replaces_and_keeps_mode(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    key = generate_key()
    save_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert raw(load_private_key(path)) == raw(key)


def test_save_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "is-a-dir"
    (target / "child").mkdir(parents=True)
    with pytest.raises(OSError):
        save_private_key(target, generate_key())
    assert sorted(os.listdir(tmp_path)) == ["is-a-dir"]


def test_saved_key_signs(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_private_key(path, generate_key())
    signer = Signer("bell-0001", load_private_key(path))
    assert verify(signer.sign(b"x"), {"bell-0001": signer.public_key}.__getitem__).payload == b"x"


def test_missing_key_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileMissing) as info:
        load_private_key(path)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ProtocolError)
    assert str(info.value) == f"no key at {path}: run `ansimi device enrol`"


def test_missing_key_custom_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `ansimi provision gateway-key`"):
        load_private_key(tmp_path / "gw.key", hint="run `ansimi provision gateway-key`")


def test_corrupt_key_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    path.write_bytes(b"not a key")
    with pytest.raises(Malformed, match=str(path)):
        load_private_key(path)
