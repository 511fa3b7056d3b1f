"""Golden vectors: fixed keys, messages and tokens any implementation of the contract must match.

Ed25519 signatures are deterministic, so the same key and payload always give the same token.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws as jose_jws
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

from protocol import (
    MESSAGE_TYPES,
    ProtocolError,
    Signer,
    dump_message,
    open_envelope,
    open_from_device,
    parse_message,
    public_key_from_b64,
    public_key_to_b64,
    verify,
)

VECTORS = Path(__file__).resolve().parents[2] / "vectors"
ENVELOPES: list[dict[str, Any]] = json.loads((VECTORS / "envelopes.json").read_text("utf-8"))
REJECTIONS: dict[str, Any] = json.loads((VECTORS / "rejections.json").read_text("utf-8"))


def by_name(cases: list[dict[str, Any]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", cases, ids=[c["name"] for c in cases])


def compact(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def test_vectors_cover_every_message_type() -> None:
    assert {c["message"]["type"] for c in ENVELOPES} == set(MESSAGE_TYPES)
    assert {c["reason"] for c in REJECTIONS["cases"]} >= {
        "bad_signature",
        "malformed",
        "unknown_signer",
        "topic_mismatch",
    }


@by_name(ENVELOPES)
def test_signer_reproduces_the_token(case: dict[str, Any]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(case["private_key_seed_hex"]))
    assert public_key_to_b64(key.public_key()) == case["public_key"]
    msg = parse_message(compact(case["message"]))
    # the wire payload is compact UTF-8 JSON in the field order shown in the vector
    assert dump_message(msg) == compact(case["message"])
    assert Signer(case["kid"], key).sign(dump_message(msg)) == case["jws"]


@by_name(ENVELOPES)
def test_token_opens_to_the_message(case: dict[str, Any]) -> None:
    resolve = {case["kid"]: public_key_from_b64(case["public_key"])}.__getitem__
    verified = verify(case["jws"], resolve)
    assert verified.kid == case["kid"]
    assert json.loads(verified.payload) == case["message"]
    opened = open_envelope(case["jws"], resolve)
    assert opened.message == parse_message(compact(case["message"]))
    assert opened.token == case["jws"]


@by_name(ENVELOPES)
def test_joserfc_agrees(case: dict[str, Any]) -> None:
    public = public_key_from_b64(case["public_key"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # "EdDSA" vs RFC 9864's "Ed25519"
        obj = jose_jws.deserialize_compact(
            case["jws"], OKPKey.import_key(public), algorithms=["EdDSA"]
        )
    assert json.loads(obj.payload) == case["message"]
    assert obj.headers()["kid"] == case["kid"]


@by_name(REJECTIONS["cases"])
def test_rejection(case: dict[str, Any]) -> None:
    keys: dict[str, Ed25519PublicKey] = {
        kid: public_key_from_b64(text) for kid, text in REJECTIONS["registry"].items()
    }
    with pytest.raises(ProtocolError) as info:
        open_from_device(case["jws"], keys.__getitem__)
    assert info.value.reason == case["reason"]
