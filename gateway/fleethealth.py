"""Each device's last heartbeat, for the people who keep the fleet working.

Per device, the last values of its health fields (power source, battery, link quality,
outbox depth, firmware, uptime) and its clock drift (the heartbeat's timestamp minus the
gateway's clock when it arrived), exposed as Prometheus gauges labelled with the device and
its district, so a dashboard can ask "which bells in mapo are on battery". The gauges are
read from the table of last heartbeats when Prometheus scrapes, not set per heartbeat.

A clock that drifts is flagged (logged once, counted, `ansimi_device_clock_drifting` = 1)
once it is `drift_flag_ms` off, well before it leaves the replay window: past the window its
messages are still kept but flagged, and each one costs a sync. A clock back within half the
threshold is cleared (hysteresis: a drift hovering at the threshold is not news every beat).
A drift is flagged only once it has lasted `DRIFT_CONFIRM_MS` of arrivals: heartbeats that
waited in a broker's queue while this gateway was away arrive together, each as "late" as
its wait, and the live ones after them show the clock was right all along.

One series per device and field: about 8 per device, 80,000 for 10,000 bells, which
Prometheus carries; a device revoked keeps its series until the gateway restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from gateway.intake import KeptHeartbeat
from gateway.metrics import Metrics
from protocol.messages import Heartbeat

log = logging.getLogger(__name__)

# a device's district; "" or None for one the gateway no longer knows
DistrictOf = Callable[[str], "str | None"]


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    heartbeat: Heartbeat
    drift_ms: int  # the device's clock minus the gateway's
    at_ms: int  # when the gateway got it
    district: str  # as the gateway knew it then: the label of the device's series
    # the last charge and signal reported, by this heartbeat or an earlier one (both are
    # optional in a heartbeat: one without them does not make the last known value unknown)
    battery_pct: int | None = None
    link_quality: int | None = None


# how long a drift past the flag must last (by arrival) before it is flagged
DRIFT_CONFIRM_MS: Final = 30_000

_LABELS: Final = ("device", "district")
# (name, help, the value of a device's series; None: no series)
_GAUGES: Final[tuple[tuple[str, str, Callable[[DeviceHealth], float | None]], ...]] = (
    (
        "ansimi_device_on_battery",
        "1 when the device runs on battery",
        lambda h: 1 if h.heartbeat.power == "battery" else 0,
    ),
    ("ansimi_device_battery_percent", "Battery charge", lambda h: h.battery_pct),
    ("ansimi_device_link_quality_percent", "Mobile signal", lambda h: h.link_quality),
    (
        "ansimi_device_outbox_depth",
        "Messages waiting for `received`",
        lambda h: h.heartbeat.outbox_depth,
    ),
    ("ansimi_device_uptime_seconds", "Since the agent started", lambda h: h.heartbeat.uptime_s),
    (
        "ansimi_device_clock_drift_ms",
        "The device's clock minus the gateway's",
        lambda h: h.drift_ms,
    ),
)
_DRIFTING: Final = ("ansimi_device_clock_drifting", "1 while the device's clock is flagged")
_FIRMWARE: Final = ("ansimi_device_firmware_info", "1 for the firmware the device reports")


class FleetHealth:
    def __init__(
        self,
        metrics: Metrics,
        *,
        district_of: DistrictOf,
        drift_flag_ms: int,
        clock_ms: Callable[[], int],
    ) -> None:
        self._district_of = district_of
        self._flag_ms = drift_flag_ms
        self._clock_ms = clock_ms
        self.last: dict[str, DeviceHealth] = {}
        self.drifting: set[str] = set()
        # device -> arrival of the first heartbeat of its current run past the flag
        self._off_since: dict[str, int] = {}
        # The per-device gauges are read from `last` when Prometheus scrapes (a scrape every
        # 15 s or so), not set on every heartbeat: eight labelled `labels().set()` calls were
        # most of a heartbeat's cost after its verify (bench/gateway.py, docs/performance.md).
        metrics.registry.register(_DeviceGauges(self))
        self.drift_flags = Counter(
            "ansimi_clock_drift_flags_total",
            "Devices whose clock drifted past the flag threshold (before the replay window)",
            registry=metrics.registry,
        )

    def heartbeats(self, beats: Iterable[KeptHeartbeat]) -> None:
        """Heartbeats just kept, oldest first, with their bodies as the intake parsed them."""
        now = self._clock_ms()
        for beat in beats:
            # against the gateway's clock when it came: it may have waited for a flush
            at = now if beat.arrived_ms is None else beat.arrived_ms
            self._keep(beat.device_id, beat.body, beat.ts_ms - at, at)

    def _keep(self, device_id: str, beat: Heartbeat, drift_ms: int, now: int) -> None:
        district = self._district_of(device_id)
        if not district:
            return  # gone since the heartbeat
        before = self.last.get(device_id)
        battery, link = beat.battery_pct, beat.link_quality
        if before is not None:
            battery = before.battery_pct if battery is None else battery
            link = before.link_quality if link is None else link
        self.last[device_id] = DeviceHealth(beat, drift_ms, now, district, battery, link)
        self._judge_drift(device_id, district, drift_ms, now)

    def _judge_drift(self, device_id: str, district: str, drift_ms: int, now: int) -> None:
        off = abs(drift_ms)
        if off >= self._flag_ms:
            lasted = now - self._off_since.setdefault(device_id, now) >= DRIFT_CONFIRM_MS
        else:
            self._off_since.pop(device_id, None)
            lasted = False
        if device_id not in self.drifting and lasted:
            self.drifting.add(device_id)
            self.drift_flags.inc()
            log.warning(
                "device %s (%s): clock %+d ms off the gateway's, past the %d ms flag: check its"
                " time source (NTP, RTC battery) before it leaves the replay window",
                device_id,
                district,
                drift_ms,
                self._flag_ms,
            )
        elif device_id in self.drifting and off < self._flag_ms // 2:
            self.drifting.discard(device_id)
            log.info("device %s (%s): clock back within %d ms", device_id, district, off)


class _DeviceGauges:
    """A Prometheus collector: each device's gauges, from its last heartbeat, at scrape time."""

    def __init__(self, health: FleetHealth) -> None:
        self._health = health

    def describe(self) -> Iterator[Metric]:
        """The families without samples: the registry checks names with these, so
        registering does not collect."""
        return iter(_Table([], frozenset()).families)

    def collect(self) -> Iterator[Metric]:
        # Called on the loop (`Metrics.render`): only a copy of the table, ~1 ms at 10,000
        # devices; the ~80,000 samples are made from it when the text is written, in the
        # scrape's thread (made here they held the loop 0.15-0.3 s a scrape)
        health = self._health
        return iter(_Table(list(health.last.items()), frozenset(health.drifting)).families)


class _Table:
    """The table of last heartbeats as a scrape found it, and its families, whose samples
    are made from it when any of them is first read. What it holds does not change:
    `DeviceHealth` and the heartbeats in it are frozen."""

    def __init__(self, rows: list[tuple[str, DeviceHealth]], drifting: frozenset[str]) -> None:
        self._rows = rows
        self._drifting = drifting
        self._made = False
        self.families = [
            *(_TableFamily(self, name, doc, _LABELS) for name, doc, _ in _GAUGES),
            _TableFamily(self, *_DRIFTING, _LABELS),
            _TableFamily(self, *_FIRMWARE, (*_LABELS, "firmware")),
        ]

    def make_samples(self) -> None:
        if self._made:
            return
        self._made = True  # first: `add_metric` reads `samples`, which comes back here
        *gauges, drifting, firmware = self.families
        for device_id, health in self._rows:
            labels = [device_id, health.district]
            for family, (_, _, value_of) in zip(gauges, _GAUGES, strict=True):
                value = value_of(health)
                if value is not None:
                    family.add_metric(labels, value)
            drifting.add_metric(labels, 1 if device_id in self._drifting else 0)
            firmware.add_metric([*labels, health.heartbeat.firmware], 1)


class _TableFamily(GaugeMetricFamily):
    """One gauge family of a `_Table`: its samples made when first read."""

    def __init__(self, table: _Table, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self._table = table
        super().__init__(name, doc, labels=labels)

    @property
    def samples(self) -> list[Sample]:
        self._table.make_samples()
        return self._samples

    @samples.setter
    def samples(self, samples: list[Sample]) -> None:
        self._samples = samples
