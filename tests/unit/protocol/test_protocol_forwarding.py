"""What the gateway forwards: the body exactly as its signer wrote it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from protocol_testkit import DEVICE, DEVICE_KEY, messages

from protocol import Message, Signer, seal
from protocol.errors import Malformed
from protocol.forwarding import signed_body


@given(messages)
def test_the_signed_body_is_the_body_that_was_signed(message: Message) -> None:
    token = seal(message, Signer(DEVICE, DEVICE_KEY))
    assert signed_body(token) == json.loads(message.body.model_dump_json())


def test_fields_the_signer_left_out_stay_out() -> None:
    written = {"v": 1, "id": "alert-0001", "body": {"trigger": "press", "bell": "emergency"}}
    token = Signer(DEVICE, DEVICE_KEY).sign(json.dumps(written).encode())
    assert signed_body(token) == {"trigger": "press", "bell": "emergency"}


@pytest.mark.parametrize("token", ["a.b", "a.b.c", "eyJ9.e30.c2ln", "eyJ9.W10.c2ln"])
def test_a_token_that_is_not_a_message_is_malformed(token: str) -> None:
    with pytest.raises(Malformed):
        signed_body(token)
