"""The monthly report per district, from the bells' own test presses (EN 50136 terms).

Every bell tests its whole path on a schedule (device/testpress.py); the gateway keeps each
test like any alert and each test that did not come through as a `test_failed` status
(gateway/testwatch.py). For a calendar month, per district:

- **transmission time**: from the press (the device's clock, corrected by the gateway's
  syncs) to the first control centre's acceptance, as median, 95th percentile and maximum;
  EN 50136-1's transmission time classes are stated on such percentiles;
- **availability**: the share of the month's tests that came through, passed / (passed +
  failed), where a failed test is one the gateway reported (stopped at the link, before a
  bell's test reached it, or at a centre). It estimates the path's availability as sampled
  by the tests, not the seconds it was up: a weekly test samples each bell four times.

Pure functions over the store's rows; `ansimi gateway report` writes them as CSV or HTML.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from gateway.errors import GatewayError
from gateway.store import TestRecord

COLUMNS = (
    "district",
    "devices_tested",
    "tests",
    "delivered",
    "failed",
    "failed_link",
    "failed_centre",
    "availability",
    "p50_s",
    "p95_s",
    "max_s",
)


class BadMonth(GatewayError, ValueError):
    pass


def month_bounds(month: str, zone: str) -> tuple[int, int]:
    """[start, end) of `month` ("2026-11") in `zone`, as epoch milliseconds."""
    try:
        first = dt.datetime.strptime(month, "%Y-%m").replace(tzinfo=ZoneInfo(zone))
    except ValueError:
        raise BadMonth(f"--month {month!r}: give a month as YYYY-MM, e.g. 2026-11") from None
    after = (first + dt.timedelta(days=32)).replace(day=1)
    return int(first.timestamp() * 1000), int(after.timestamp() * 1000)


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value at or above `share` of the values."""
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class DistrictFigures:
    district: str
    devices: set[str] = field(default_factory=set)
    delivered_s: list[float] = field(default_factory=list)
    undelivered: int = 0  # received, but no centre accepted it (yet)
    failed: dict[str, int] = field(default_factory=lambda: {"link": 0, "centre": 0})

    @property
    def tests(self) -> int:
        # a test failed at the centre was also received: counted once, as failed
        return len(self.delivered_s) + self.undelivered + self.failed["link"]

    @property
    def failed_total(self) -> int:
        return self.failed["link"] + self.failed["centre"]

    def row(self) -> dict[str, object]:
        times = sorted(self.delivered_s)
        judged = len(times) + self.failed_total
        return {
            "district": self.district,
            "devices_tested": len(self.devices),
            "tests": self.tests,
            "delivered": len(times),
            "failed": self.failed_total,
            "failed_link": self.failed["link"],
            "failed_centre": self.failed["centre"],
            "availability": round(len(times) / judged, 5) if judged else None,
            "p50_s": round(percentile(times, 0.50), 3) if times else None,
            "p95_s": round(percentile(times, 0.95), 3) if times else None,
            "max_s": round(times[-1], 3) if times else None,
        }


def monthly_rows(records: Iterable[TestRecord]) -> list[dict[str, object]]:
    """One row per district, from a month's test records."""
    by_district: dict[str, DistrictFigures] = {}
    for record in records:
        body = json.loads(record.body_json)
        figures = by_district.setdefault(record.district, DistrictFigures(record.district))
        figures.devices.add(record.device_id)
        if record.type == "status":
            if body.get("state") == "test_failed":
                stage = body.get("stage") if body.get("stage") in ("link", "centre") else "link"
                figures.failed[stage] += 1
        elif body.get("trigger") == "test":
            if record.delivered_ms is None:
                figures.undelivered += 1
            else:
                figures.delivered_s.append(max(0, record.delivered_ms - record.ts_ms) / 1000)
    return [by_district[name].row() for name in sorted(by_district)]


def to_csv(rows: list[dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return out.getvalue()


def to_html(rows: list[dict[str, object]], month: str, site: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape('' if r[c] is None else str(r[c]))}</td>" for c in COLUMNS)
        + "</tr>"
        for r in rows
    )
    title = f"Test presses {html.escape(month)}, {html.escape(site)}"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{title}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px;"
        "text-align:right}</style></head><body>"
        f"<h1>{title}</h1>"
        "<p>Transmission time: press to the first centre's acceptance, in seconds (nearest"
        " rank). Availability: tests delivered / (delivered + failed) (EN 50136 terms, sampled"
        " by the bells' scheduled tests).</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>\n"
    )
