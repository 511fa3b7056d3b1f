"""The MQTT session's link watch: when to probe the link and when to give it up.

Time is an argument of `LinkWatch`, so no test here sleeps; the same rules against a real
broker behind a black-holing proxy are in tests/integration/test_mqtt_session.py.
"""

from __future__ import annotations

import pytest

from ansimi.mqtt import LinkWatch

ACK_S = 3.0
KEEPALIVE_S = 10.0


def watch_connected_at(now: float = 100.0) -> LinkWatch:
    watch = LinkWatch(ACK_S, KEEPALIVE_S)
    watch.connected(now)
    return watch


def test_an_urgent_publish_without_its_puback_probes_then_declares_the_link_dead() -> None:
    watch = watch_connected_at(100.0)
    watch.expect(mid=7, now=101.0)
    assert watch.next_check() == 101.0 + ACK_S
    assert watch.due(103.9) is None
    assert watch.due(104.0) == ("probe", "ack_timeout")
    watch.probe_sent(104.0, "ack_timeout")
    assert watch.next_check() == 104.0 + ACK_S
    assert watch.due(106.9) is None
    # no PINGRESP within the same bound: dead, ack_timeout_s * 2 after the press
    assert watch.due(107.0) == ("dead", "ack_timeout")


def test_a_puback_in_time_leaves_the_link_alone() -> None:
    watch = watch_connected_at(100.0)
    watch.expect(mid=7, now=101.0)
    watch.heard(101.2)
    watch.acked(7)
    assert watch.due(104.5) is None
    assert watch.next_check() == 100.0 + KEEPALIVE_S  # only the keepalive is left


def test_a_probe_answered_clears_the_suspicion_and_forgives_the_late_puback() -> None:
    watch = watch_connected_at(100.0)
    watch.expect(mid=7, now=100.0)
    watch.probe_sent(103.0, "ack_timeout")
    watch.heard(103.5)
    assert watch.probes_answered == 0
    watch.answered(103.5)
    assert not watch.probing and watch.probes_answered == 1
    # the broker is slow, not gone: the late PUBACK makes no second probe
    assert watch.due(104.0) is None
    # an urgent publish after the answer is watched again on its own
    watch.expect(mid=8, now=104.0)
    assert watch.due(107.0) == ("probe", "ack_timeout")


def test_an_alert_never_acked_on_a_link_that_answers_pings_gives_the_link_up() -> None:
    # RabbitMQ 3.10 after a node was killed: pings answered, the alert never taken
    watch = LinkWatch(ACK_S, KEEPALIVE_S, give_up_s=15.0)
    watch.connected(100.0)
    watch.expect(mid=7, now=100.0)
    assert watch.due(103.0) == ("probe", "ack_timeout")
    watch.probe_sent(103.0, "ack_timeout")
    watch.heard(103.1)
    watch.answered(103.1)
    assert watch.due(104.0) is None  # forgiven: a slow broker is not a dead link
    watch.heard(110.0)
    watch.sent(110.0)
    assert watch.next_check() == 115.0
    assert watch.due(114.9) is None
    assert watch.due(115.0) == ("dead", "puback_stuck")
    # a new connection gives what paho resends there a whole bound again
    watch.connected(116.0)
    watch.expect(mid=7, now=116.0)
    watch.probe_sent(119.0, "ack_timeout")
    watch.answered(119.1)
    watch.heard(125.0)
    watch.sent(125.0)
    assert watch.due(130.9) is None
    watch.acked(7)
    assert watch.due(131.0) is None


def test_the_give_up_bound_never_comes_before_a_probe_could_clear_the_link() -> None:
    assert LinkWatch(ack_timeout_s=20.0, idle_s=60.0, give_up_s=15.0).give_up_s == 40.0


def test_traffic_without_a_pingresp_does_not_answer_a_probe() -> None:
    # a link that still brings messages down but takes nothing up is not alive for us
    watch = watch_connected_at(100.0)
    watch.expect(mid=7, now=100.0)
    watch.probe_sent(103.0, "ack_timeout")
    watch.heard(104.0)
    assert watch.due(106.0) == ("dead", "ack_timeout")


def test_a_quiet_link_is_probed_at_the_keepalive_and_dead_one_bound_later() -> None:
    watch = watch_connected_at(100.0)
    watch.heard(102.0)
    watch.sent(102.0)
    assert watch.next_check() == 102.0 + KEEPALIVE_S
    assert watch.due(111.9) is None
    assert watch.due(112.0) == ("probe", "idle")
    watch.probe_sent(112.0, "idle")
    assert watch.due(112.0 + ACK_S - 0.1) is None
    assert watch.due(112.0 + ACK_S) == ("dead", "idle")
    # found within keepalive + bound of the last packet heard: within two heartbeats for
    # a device whose keepalive is its heartbeat, when the heartbeat is at least the bound
    assert watch.next_check() - 102.0 == KEEPALIVE_S + ACK_S <= 2 * KEEPALIVE_S


def test_nothing_sent_for_the_keepalive_is_probed_even_while_hearing() -> None:
    # MQTT's keepalive duty: the broker must hear from us, or it drops us at 1.5 x keepalive
    watch = watch_connected_at(100.0)
    for t in range(101, 112):
        watch.heard(float(t))
    assert watch.due(110.0) == ("probe", "idle")


def test_a_short_keepalive_does_not_shorten_the_probe_answer() -> None:
    # a slow but working link gets as long to answer a probe as an urgent PUBACK
    watch = LinkWatch(ack_timeout_s=3.0, idle_s=1.0)
    watch.connected(0.0)
    assert watch.due(1.0) == ("probe", "idle")
    watch.probe_sent(1.0, "idle")
    assert watch.due(3.9) is None
    assert watch.due(4.0) == ("dead", "idle")


def test_paused_reading_is_no_evidence_of_a_dead_link() -> None:
    watch = watch_connected_at(100.0)
    watch.probe_sent(110.0, "idle")
    # reading was paused from 110 to 120: the PINGRESP may be waiting unread
    watch.resumed(120.0)
    assert watch.due(120.0) is None
    assert watch.due(120.0 + ACK_S) == ("dead", "idle")


def test_a_new_connection_starts_clean() -> None:
    watch = watch_connected_at(100.0)
    watch.expect(mid=7, now=100.0)
    watch.probe_sent(103.0, "ack_timeout")
    watch.connected(200.0)
    assert not watch.probing
    assert watch.due(203.0) is None
    assert watch.next_check() == 200.0 + KEEPALIVE_S


@pytest.mark.parametrize(("ack_s", "idle_s"), [(0.0, 10.0), (3.0, 0.0), (-1.0, 10.0)])
def test_bounds_must_be_positive(ack_s: float, idle_s: float) -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        LinkWatch(ack_s, idle_s)
