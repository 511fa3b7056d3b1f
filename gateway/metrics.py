"""Prometheus metrics, one registry per gateway so that tests can run several in a process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric

from protocol.errors import REASONS

# the store could not write at all: what the intake could not keep (devices resend it)
STORE_DOWN = ("store_full", "store_unavailable", "store_locked", "store_down")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rejected = Counter(
            "ansimi_rejected_total",
            "Uplink messages refused, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in (*REASONS, "revoked", "unknown_device", "internal", *STORE_DOWN):
            self.rejected.labels(reason)
        self.accepted = Counter(
            "ansimi_accepted_total",
            "Uplink messages kept, by type",
            ["type"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "ansimi_duplicates_total",
            "Resent messages already kept: re-acked, not forwarded again",
            registry=self.registry,
        )
        self.forwarded = Counter(
            "ansimi_forwarded_total",
            "Deliveries accepted by a control centre",
            ["centre"],
            registry=self.registry,
        )
        self.forward_failures = Counter(
            "ansimi_forward_failures_total",
            "Delivery attempts that failed and will be retried",
            ["centre"],
            registry=self.registry,
        )
        self.waiting = Gauge(
            "ansimi_forward_waiting",
            "Deliveries kept and not yet accepted by their centre",
            registry=self.registry,
        )
        self.supervision = Counter(
            "ansimi_supervision_events_total",
            "Devices that went offline or came back online (also those the centres hear of"
            " as part of a district outage), and district outages told to the centres",
            ["event"],
            registry=self.registry,
        )
        for event in ("online", "offline", "district_outage", "district_restored"):
            self.supervision.labels(event)
        self.devices_watched = Gauge(
            "ansimi_devices_watched",
            "Devices this instance is timing heartbeats for",
            registry=self.registry,
        )
        self.intake_queue = Gauge(
            "ansimi_intake_queue",
            "Uplink messages received and not yet checked: a backlog that grows means overload",
            registry=self.registry,
        )
        self.intake_paused = Gauge(
            "ansimi_intake_paused",
            "1 while reading from the broker is paused because the intake is behind",
            registry=self.registry,
        )
        self.clock_skewed = Counter(
            "ansimi_clock_skewed_total",
            "Uplink messages kept though their timestamp was outside the window (flagged)",
            registry=self.registry,
        )
        self.syncs = Counter(
            "ansimi_syncs_total",
            "Syncs sent to devices, by reason (clock, sequence); limited: not sent, too soon",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("clock", "sequence", "limited"):
            self.syncs.labels(reason)
        self.store_errors = Counter(
            "ansimi_store_errors_total",
            "Group commits that failed (their messages were retried one by one)",
            registry=self.registry,
        )
        self.consumer_failures = Counter(
            "ansimi_intake_consumer_failures_total",
            "Kept messages a consumer (fleet health, remote config, rollouts, video) failed "
            "on; the messages were kept and acked all the same",
            ["consumer"],
            registry=self.registry,
        )
        self.api_refused = Counter(
            "ansimi_api_refused_total",
            "API requests refused before any handler: bad ids or numbers, slow clients, "
            "other districts",
            ["reason"],
            registry=self.registry,
        )
        self.update_reports = Counter(
            "ansimi_update_reports_total",
            "Devices' reports on a rollout's update: installed, failed, or not now (retried)",
            ["outcome"],
            registry=self.registry,
        )
        self.escalations = Counter(
            "ansimi_incident_escalations_total",
            "Escalation steps taken for incidents nobody acknowledged in time, by centre",
            ["centre"],
            registry=self.registry,
        )
        self.intake_batch = Histogram(
            "ansimi_intake_batch_size",
            "Messages committed per group commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=self.registry,
        )

    async def render(self) -> bytes:
        """The Prometheus text of every metric, without holding the event loop for its writing.

        Collected here, on the loop: every counter, gauge and `set_function` (some read the
        gateway's state) at one instant, and fleet health's table copied (its samples are
        made when read: gateway/fleethealth.py), ~2 ms at 10,000 devices. Written in a
        thread: the text of those ~80,000 series, 0.3-0.5 s that the loop used to spend
        taking no alert in. The thread reads only these families, which nothing else holds,
        never a live metric.
        """
        families = list(self.registry.collect())
        return await asyncio.to_thread(generate_latest, _Collected(families))


class _Collected:
    """Families collected already, as a collector for `generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
