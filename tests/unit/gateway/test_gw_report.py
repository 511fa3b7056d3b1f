"""The monthly report per district, from test presses kept in the store."""

from __future__ import annotations

import csv
import datetime as dt
import io
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from ansimi_testkit import CENTRAL_TOML
from click.testing import CliRunner

from gateway.cli import gateway
from gateway.report import BadMonth, month_bounds, percentile
from gateway.store import Device, Incoming, SqliteDatabase
from protocol.messages import Alert, Status

SEOUL = ZoneInfo("Asia/Seoul")
NOV = dt.datetime(2026, 11, 10, 11, 0, tzinfo=SEOUL)


def ms(at: dt.datetime) -> int:
    return int(at.timestamp() * 1000)


def test_percentiles_take_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 21)]  # 1..20
    assert (percentile(values, 0.5), percentile(values, 0.95)) == (10.0, 19.0)
    assert percentile([7.0], 0.95) == 7.0


def test_a_month_begins_and_ends_at_local_midnight() -> None:
    start, end = month_bounds("2026-12", "Asia/Seoul")
    assert start == ms(dt.datetime(2026, 12, 1, tzinfo=SEOUL))
    assert end == ms(dt.datetime(2027, 1, 1, tzinfo=SEOUL))
    with pytest.raises(BadMonth, match="YYYY-MM"):
        month_bounds("November", "UTC")


def keep_test(
    db: SqliteDatabase, event_id: str, device_id: str, pressed: dt.datetime, took_s: float | None
) -> None:
    body = Alert(bell="emergency", trigger="test").model_dump_json()
    item = Incoming(event_id, device_id, 1, "alert", ms(pressed), body, "jws", ("central",))
    received = ms(pressed) + 200
    db.add_event(item, now_ms=received)
    if took_s is not None:
        db.delivered_many([(event_id, "central")], ms(pressed) + int(took_s * 1000))


def test_the_report_gives_each_district_its_times_and_availability_as_csv_and_html(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gateway.db"
    db = SqliteDatabase(path)
    for device_id, district in (
        ("bell-0001", "mapo"),
        ("bell-0002", "mapo"),
        ("bell-0003", "gangnam"),
    ):
        db.add_device(Device(device_id, "key", "bell", district), now_ms=0)
    # mapo: 20 tests delivered in 1..20 s, one stopped at the link (reported by the gateway)
    for n in range(20):
        keep_test(
            db, f"test-mapo-{n:04d}", f"bell-000{1 + n % 2}", NOV + dt.timedelta(hours=n), n + 1
        )
    failed = Status(state="test_failed", stage="link").model_dump_json()
    db.add_event(
        Incoming("fail-mapo-0001", "bell-0002", 2, "status", ms(NOV), failed, "j", ()), ms(NOV)
    )
    # gangnam: one delivered in 2.5 s, one received but never delivered (not judged yet)
    keep_test(db, "test-gang-0001", "bell-0003", NOV, 2.5)
    keep_test(db, "test-gang-0002", "bell-0003", NOV + dt.timedelta(days=1), None)
    # not this month's, and not a test: neither counts
    keep_test(db, "test-octo-0001", "bell-0003", dt.datetime(2026, 10, 31, 23, 0, tzinfo=SEOUL), 1)
    press = Alert(bell="emergency", trigger="press").model_dump_json()
    db.add_event(
        Incoming("real-press-01", "bell-0001", 3, "alert", ms(NOV), press, "j", ()), ms(NOV)
    )
    db.close()
    config = tmp_path / "gateway.toml"
    config.write_text(f'database = "{path}"\n' + CENTRAL_TOML)
    runner = CliRunner()
    done = runner.invoke(gateway, ["report", "--config", str(config), "--month", "2026-11"])
    assert done.exit_code == 0, done.output
    rows = {r["district"]: r for r in csv.DictReader(io.StringIO(done.output))}
    assert rows["mapo"] == {
        "district": "mapo",
        "devices_tested": "2",
        "tests": "21",
        "delivered": "20",
        "failed": "1",
        "failed_link": "1",
        "failed_centre": "0",
        "availability": str(round(20 / 21, 5)),
        "p50_s": "10.0",
        "p95_s": "19.0",
        "max_s": "20.0",
    }
    gangnam = rows["gangnam"]
    assert (gangnam["tests"], gangnam["delivered"], gangnam["availability"]) == ("2", "1", "1.0")
    assert gangnam["p95_s"] == "2.5"
    out = tmp_path / "report.html"
    argv = ["report", "--config", str(config), "--month", "2026-11", "--format", "html"]
    done = runner.invoke(gateway, [*argv, "--out", str(out)])
    assert done.exit_code == 0 and "2 district(s)" in done.output
    page = out.read_text()
    assert "<td>mapo</td>" in page and "<td>0.95238</td>" in page
    bad = runner.invoke(gateway, ["report", "--config", str(config), "--month", "11/2026"])
    assert bad.exit_code == 2 and "YYYY-MM" in bad.output
