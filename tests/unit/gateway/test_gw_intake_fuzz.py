"""Hostile input, generated: random bytes, truncations, bit flips and messages re-signed by
another registered device, on the right and the wrong topics. No exception escapes, every
one is counted under some refusal reason, nothing is stored, acked or forwarded."""

from __future__ import annotations

import asyncio

from gw_testkit import ALERT, Env, heartbeat, make_env, signer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansimi.mqtt import Message as MqttMessage
from protocol.envelope import seal
from protocol.messages import Body, Cancel, Status, build_message
from protocol.topics import up_topic

DEVICES = ("bell-0001", "bell-0002", "bell-0003", "bell-0009")
TYPES = ("alert", "cancel", "heartbeat", "status", "rtc")
BODIES: list[Body] = [ALERT, Cancel(alert_id="abcdefgh1234"), heartbeat(), Status(state="online")]

topics = st.one_of(
    st.builds(up_topic, st.sampled_from(DEVICES), st.sampled_from(TYPES)),
    st.text(max_size=80),
    st.builds(
        lambda d, t: f"ansimi/v1/{d}/down/{t}",
        st.sampled_from(DEVICES),
        st.sampled_from(("ack", "command")),
    ),
)


def _valid(env: Env, body: Body, device: str, seq: int = 10**6) -> bytes:
    """A message that would be accepted, as the starting point for damage.

    Same length every time (fixed id and seq): hypothesis needs the same draws to mean
    the same thing from one example to the next.
    """
    msg = build_message(body, device=device, seq=seq, ts=env.clock.ms, id="damaged-0001")
    return seal(msg, signer(device)).encode()


@st.composite
def hostile(draw: st.DrawFn, env: Env) -> MqttMessage:
    body = draw(st.sampled_from(BODIES))
    kind = draw(st.sampled_from(("random", "truncated", "flipped", "resigned", "oversized")))
    if kind == "random":
        return MqttMessage(draw(topics), draw(st.binary(max_size=2048)), 1)
    if kind == "oversized":  # a valid message with more after it, past the size limit
        padding = b"A" * (16 * 1024) + draw(st.binary(min_size=1, max_size=64))
        return MqttMessage(
            up_topic("bell-0001", "alert"), _valid(env, ALERT, "bell-0001") + padding, 1
        )
    if kind == "resigned":
        # bell-0002 (registered) signs a message about bell-0001, or bell-0001's own
        # message is sent on bell-0002's topic: a device may speak only for itself
        about = draw(st.sampled_from(("bell-0001", "bell-0002")))
        by = "bell-0002" if about == "bell-0001" else "bell-0001"
        msg = build_message(body, device=about, seq=10**6, ts=env.clock.ms)
        topic_device = draw(st.sampled_from((about, by)))
        topic = up_topic(topic_device, msg.type) if draw(st.booleans()) else draw(topics)
        return MqttMessage(topic, seal(msg, signer(by)).encode(), 1)
    payload = _valid(env, body, "bell-0001")
    topic = up_topic("bell-0001", body_type(body))
    if draw(st.booleans()):
        topic = draw(topics)
    if kind == "truncated":
        cut = draw(st.integers(0, len(payload) - 1))
        return MqttMessage(topic, payload[:cut], 1)
    bit = draw(st.integers(0, len(payload) * 8 - 1))
    flipped = bytearray(payload)
    flipped[bit // 8] ^= 1 << (bit % 8)
    # a flipped topic bit can make another valid topic: keep the message's own then
    return MqttMessage(up_topic("bell-0001", body_type(body)), bytes(flipped), 1)


def body_type(body: Body) -> str:
    return type(body).__name__.lower()


def test_hostile_messages_are_all_refused_and_counted() -> None:
    with asyncio.Runner() as runner:
        env = runner.run(make_env())

        @settings(
            max_examples=400,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.data())
        def one(data: st.DataObject) -> None:
            batch = data.draw(st.lists(hostile(env), min_size=1, max_size=4))
            before = env.rejected()
            runner.run(env.intake.process(batch))  # raises nothing
            assert env.rejected() == before + len(batch)
            assert env.rejected("internal") == 0
            assert env.event_count() == 0
            assert env.store.database.waiting_count() == 0
            assert env.sent == []
            assert env.woken == []

        one()
        # and the intake still works afterwards
        good = MqttMessage(up_topic("bell-0001", "alert"), _valid(env, ALERT, "bell-0001"), 1)
        runner.run(env.intake.process([good]))
        assert env.event_count() == 1
