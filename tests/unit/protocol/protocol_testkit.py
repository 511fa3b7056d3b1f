"""Keys, ids and hypothesis strategies shared by the protocol tests.

A plain module (not conftest) so tests can import it by a name no other test tree uses.
"""

from __future__ import annotations

from typing import Any, get_args

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import strategies as st

from protocol import (
    ACK_STAGES,
    UP_TYPES,
    Ack,
    Alert,
    Cancel,
    Command,
    Health,
    Heartbeat,
    Message,
    Rtc,
    Status,
    Sync,
    build_message,
)
from protocol.messages import (
    GATEWAY_STATES,
    Escalation,
    SecondaryPath,
    SimState,
    StatusState,
    TestStage,
)

DEVICE = "bell-0001"
GATEWAY = "gw-seoul-1"
# fixed seeds: failures reproduce byte for byte
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GATEWAY_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))

device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{2,63}", fullmatch=True)
message_ids = st.from_regex(r"[A-Za-z0-9_-]{8,64}", fullmatch=True)
uint63 = st.integers(0, 2**63 - 1)
percent = st.none() | st.integers(0, 100)

alerts = st.builds(
    Alert,
    bell=st.sampled_from(["emergency", "doorbell", "store"]),
    trigger=st.sampled_from(
        [
            "press",
            "long_press",
            "doorbell_ring",
            "tamper",
            "tamper_cleared",
            "duress",
            "power_loss",
            "power_restored",
        ]
    ),
    silent=st.booleans(),
    urgent=st.booleans(),
    presses=st.integers(1, 2**31 - 1),
    linked_to=st.none() | message_ids,
)
cancels = st.builds(Cancel, alert_id=message_ids)
heartbeats = st.builds(
    Heartbeat,
    uptime_s=uint63,
    power=st.sampled_from(["mains", "battery"]),
    battery_pct=percent,
    link_quality=percent,
    firmware=st.text(max_size=64),
    outbox_depth=uint63,
    secondary=st.none()
    | st.builds(
        SecondaryPath,
        modem=st.booleans(),
        sim=st.sampled_from(get_args(SimState)),
        registered=st.none() | st.booleans(),
        signal=percent,
        numbers=st.integers(0, 8),
    ),
)
# states that carry more than the state: a district's list, a failed test's stage
_GROUPED = ("district_outage", "district_restored")
_PLAIN = [s for s in get_args(StatusState) if s not in (*_GROUPED, "test_failed")]
statuses = (
    st.builds(Status, state=st.sampled_from(_PLAIN))
    | st.builds(Status, state=st.just("test_failed"), stage=st.sampled_from(get_args(TestStage)))
    | st.builds(
        Status,
        state=st.sampled_from(_GROUPED),
        district=st.sampled_from(["mapo", "gangnam"]),
        count=st.integers(0, 10_000),
        offline=st.lists(device_ids, max_size=5),
    )
)
sdps = st.text(max_size=300)
reasons = st.none() | st.text(max_size=200)
rtcs = st.one_of(
    st.builds(Rtc, kind=st.just("offer"), session=message_ids, sdp=sdps, reason=reasons),
    st.builds(
        Rtc, kind=st.just("answer"), session=message_ids, sdp=st.none() | sdps, reason=reasons
    ),
    st.builds(Rtc, kind=st.just("bye"), session=message_ids, reason=reasons),
)
acks = st.builds(Ack, ref=message_ids, stage=st.sampled_from(ACK_STAGES))
arg_values = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=256)
)
commands = st.builds(
    Command,
    name=st.sampled_from(["video_start", "video_stop", "selftest", "set_silent", "ping"]),
    args=st.dictionaries(st.text(min_size=1, max_size=32), arg_values, max_size=16),
)
int64 = st.integers(-(2**63), 2**63 - 1)
healths = st.builds(
    Health,
    event=st.sampled_from(
        ["clock_corrected", "outbox_recovered", "storage_failed", "storage_restored"]
    ),
    skew_ms=st.none() | int64,
    salvaged=st.none() | uint63,
    detail=st.none() | st.text(max_size=200),
)
syncs = st.builds(
    Sync, ref=message_ids, reason=st.sampled_from(["clock", "sequence"]), next_seq=uint63
)
escalations = st.builds(
    Escalation,
    incident=message_ids,
    level=st.integers(1, 64),
    to=st.text(min_size=1, max_size=64),
    kind=st.text(min_size=1, max_size=32),
    priority=st.integers(1, 1000),
)
BODIES: dict[str, st.SearchStrategy[Any]] = {
    "alert": alerts,
    "cancel": cancels,
    "heartbeat": heartbeats,
    "status": statuses,
    "rtc": rtcs,
    "ack": acks,
    "command": commands,
    "health": healths,
    "sync": syncs,
    "escalation": escalations,
}


def messages_of(body: st.SearchStrategy[Any]) -> st.SearchStrategy[Message]:
    return st.builds(
        build_message,
        body,
        device=device_ids,
        seq=uint63,
        ts=uint63,
        id=st.none() | message_ids,
    )


messages = st.one_of([messages_of(b) for b in BODIES.values()])
# what a device may send: every type it sends, but no status only the gateway reports
device_statuses = st.builds(
    Status, state=st.sampled_from([s for s in get_args(StatusState) if s not in GATEWAY_STATES])
)
up_messages = st.one_of(
    [messages_of(device_statuses if t == "status" else BODIES[t]) for t in UP_TYPES]
)
