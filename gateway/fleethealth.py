"""Each device's last heartbeat, for the people who keep the fleet working.

Per device, the last values of its health fields (power source, battery, link quality,
outbox depth, firmware, uptime) and its clock drift (the heartbeat's timestamp minus the
gateway's clock when it arrived), exposed as Prometheus gauges labelled with the device and
its district, so a dashboard can ask "which bells in mapo are on battery".

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from prometheus_client import Counter, Gauge

from gateway.metrics import Metrics
from gateway.store import Incoming
from protocol.messages import Heartbeat

log = logging.getLogger(__name__)

# a device's district; "" or None for one the gateway no longer knows
DistrictOf = Callable[[str], "str | None"]


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    heartbeat: Heartbeat
    drift_ms: int  # the device's clock minus the gateway's
    at_ms: int  # when the gateway got it


# how long a drift past the flag must last (by arrival) before it is flagged
DRIFT_CONFIRM_MS: Final = 30_000


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
        labels = ["device", "district"]
        registry = metrics.registry
        self._on_battery = Gauge(
            "ansimi_device_on_battery",
            "1 when the device runs on battery",
            labels,
            registry=registry,
        )
        self._battery = Gauge(
            "ansimi_device_battery_percent", "Battery charge", labels, registry=registry
        )
        self._link = Gauge(
            "ansimi_device_link_quality_percent", "Mobile signal", labels, registry=registry
        )
        self._outbox = Gauge(
            "ansimi_device_outbox_depth",
            "Messages waiting for `received`",
            labels,
            registry=registry,
        )
        self._uptime = Gauge(
            "ansimi_device_uptime_seconds", "Since the agent started", labels, registry=registry
        )
        self._drift = Gauge(
            "ansimi_device_clock_drift_ms",
            "The device's clock minus the gateway's",
            labels,
            registry=registry,
        )
        self._drifting = Gauge(
            "ansimi_device_clock_drifting",
            "1 while the device's clock is flagged",
            labels,
            registry=registry,
        )
        self._firmware = Gauge(
            "ansimi_device_firmware_info",
            "1 for the firmware the device reports",
            [*labels, "firmware"],
            registry=registry,
        )
        self.drift_flags = Counter(
            "ansimi_clock_drift_flags_total",
            "Devices whose clock drifted past the flag threshold (before the replay window)",
            registry=registry,
        )

    def heartbeats(self, items: Iterable[Incoming]) -> None:
        """Incoming messages just checked; the heartbeats among them update the view."""
        now = self._clock_ms()
        for item in items:
            if item.type == "heartbeat":
                beat = Heartbeat.model_validate_json(item.body_json)
                self._keep(item.device_id, beat, item.ts_ms - now, now)

    def _keep(self, device_id: str, beat: Heartbeat, drift_ms: int, now: int) -> None:
        district = self._district_of(device_id)
        if not district:
            return  # gone since the heartbeat
        before = self.last.get(device_id)
        self.last[device_id] = DeviceHealth(beat, drift_ms, now)
        labels = (device_id, district)
        self._on_battery.labels(*labels).set(1 if beat.power == "battery" else 0)
        for gauge, value in (
            (self._battery, beat.battery_pct),
            (self._link, beat.link_quality),
        ):
            if value is not None:
                gauge.labels(*labels).set(value)
        self._outbox.labels(*labels).set(beat.outbox_depth)
        self._uptime.labels(*labels).set(beat.uptime_s)
        self._drift.labels(*labels).set(drift_ms)
        if before is not None and before.heartbeat.firmware != beat.firmware:
            self._firmware.remove(*labels, before.heartbeat.firmware)
        self._firmware.labels(*labels, beat.firmware).set(1)
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
        self._drifting.labels(device_id, district).set(1 if device_id in self.drifting else 0)
