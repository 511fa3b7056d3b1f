"""The webhook: HMAC first, then the device's own signature over exactly what is delivered."""

from __future__ import annotations

from pathlib import Path

from console_testkit import (
    GATEWAY_KEY,
    OTHER_KEY,
    PRESS,
    FakeGateway,
    delivery,
    desk,
    headers_for,
    now_ms,
    registry_entry,
    status_delivery,
)

from console.receiver import ReceivedEvent
from protocol.envelope import seal
from protocol.forwarding import SIGNATURE_HEADER
from protocol.jws import Signer
from protocol.keys import public_key_to_b64
from protocol.messages import Alert, Cancel, build_message


async def test_a_signed_press_is_kept_once_and_pushed(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        pushed: list[ReceivedEvent] = []
        d.console.receiver.listeners.append(pushed.append)
        data = delivery()
        assert (await d.deliver(data))[0] == 200
        assert (await d.deliver(data))[0] == 200  # the gateway's retry: kept once
        assert d.console.receiver.events.ids() == [data["event_id"]]
        assert [e.event_id for e in pushed] == [data["event_id"]]
        assert pushed[0].signer == "bell-0001"


async def test_a_wrong_hmac_is_refused_before_anything_else(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        status, body = await d.deliver(delivery(), secret="another-secret-entirely")
        assert status == 401 and body["error"] == "bad signature"
        assert d.console.receiver.events.count() == 0


async def test_a_gateway_clock_off_by_more_than_the_skew_is_retried_not_refused(
    tmp_path: Path,
) -> None:
    """503, not 4xx: the same delivery succeeds once the clocks agree, and the gateway
    parks what a centre refuses with a 4xx until someone retries it by hand."""
    async with desk(tmp_path) as d:
        press = delivery()
        status, body = await d.deliver(press, sent_ms=now_ms() - 600_000)
        assert status == 503 and "skew" in body["error"]
        assert d.console.receiver.events.count() == 0
        assert (await d.deliver(press))[0] == 200  # the gateway's retry, clocks fixed


async def test_a_press_signed_with_another_key_is_refused(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        status, body = await d.deliver(delivery(key=OTHER_KEY))
        assert status == 401 and "does not verify" in body["error"]
        assert d.console.receiver.events.count() == 0


async def test_a_delivery_that_differs_from_the_signed_payload_is_refused(
    tmp_path: Path,
) -> None:
    async with desk(tmp_path) as d:
        quiet = Alert(bell="emergency", trigger="press", silent=True)
        swapped = delivery(tamper={"body": {**delivery(quiet)["body"]}})
        status, body = await d.deliver(swapped)
        assert status == 400 and "body" in body["error"]
        other_device = delivery(tamper={"device_id": "bell-0002"})
        status, body = await d.deliver(other_device)
        assert status == 401 and "not by the device" in body["error"]
        assert d.console.receiver.events.count() == 0


async def test_an_unknown_signer_fetches_the_registry_then_is_kept(tmp_path: Path) -> None:
    gateway = FakeGateway()
    async with desk(tmp_path, gateway) as d:
        reads = gateway.device_reads
        # enrolled after the console's last sync: the first delivery triggers a fetch
        gateway.devices.append(registry_entry("bell-0002"))
        assert (await d.deliver(delivery(device="bell-0002")))[0] == 200
        assert gateway.device_reads == reads + 1


async def test_a_signer_the_registry_does_not_know_is_deferred_not_dropped(
    tmp_path: Path,
) -> None:
    async with desk(tmp_path) as d:
        status, body = await d.deliver(delivery(device="bell-0404"))
        # 503: the gateway keeps it in its outbox and tries again later
        assert status == 503 and "unknown signer" in body["error"]


async def test_a_revoked_devices_alert_signed_before_its_revocation_still_arrives(
    tmp_path: Path,
) -> None:
    # pressed, then the bell revoked while the centre was down: the gateway accepted the
    # alert before the revocation and retries it; the centre must still take it
    signed_at = now_ms()
    gateway = FakeGateway(devices=[registry_entry(revoked=True, revoked_ms=signed_at + 60_000)])
    async with desk(tmp_path, gateway) as d:
        before = delivery()
        assert (await d.deliver(before))[0] == 200
        assert d.console.receiver.events.ids() == [before["event_id"]]


async def test_a_revoked_devices_later_signature_is_refused_for_good(tmp_path: Path) -> None:
    revoked_at = now_ms() - 3_600_000  # an hour ago: far outside the gateway's window
    gateway = FakeGateway(
        devices=[
            registry_entry(revoked=True, revoked_ms=revoked_at),
            registry_entry("bell-0002", revoked=True),  # revoked when no time was kept
        ]
    )
    async with desk(tmp_path, gateway) as d:
        for device in ("bell-0001", "bell-0002"):
            status, body = await d.deliver(delivery(device=device))
            # 403, not 503: retrying cannot help, and must not trip the circuit breaker
            assert status == 403 and "revoked before" in body["error"], body
        assert d.console.receiver.events.count() == 0


async def test_a_revoked_bell_whose_clock_ran_ahead_is_judged_by_the_gateways_receipt(
    tmp_path: Path,
) -> None:
    # the bell's clock was an hour ahead: the gateway kept its alert (flagged with the skew)
    # a minute before the bell was revoked; the signed time alone says "after"
    received_at = now_ms()
    hour_ms = 3_600_000
    gateway = FakeGateway(devices=[registry_entry(revoked=True, revoked_ms=received_at + 60_000)])
    async with desk(tmp_path, gateway) as d:
        ahead = delivery(ts=received_at + hour_ms)
        unflagged = await d.deliver(ahead)
        assert unflagged[0] == 403, unflagged  # without the gateway's flag: after revocation
        assert (await d.deliver({**ahead, "clock_skew_ms": hour_ms}))[0] == 200
        assert d.console.receiver.events.ids() == [ahead["event_id"]]
        # a skew that is not a number is the gateway's bug, refused, never guessed at
        status, body = await d.deliver(delivery(tamper={"clock_skew_ms": "soon"}))
        assert status == 400 and "clock_skew_ms" in body["error"]


async def test_status_events_are_checked_with_the_gateways_key(tmp_path: Path) -> None:
    async with desk(tmp_path) as d:
        assert (await d.deliver(status_delivery("offline")))[0] == 200
        # the gateway's key signs status, never a press in a device's name
        forged = delivery(key=GATEWAY_KEY, kid="gw-test")
        status, _ = await d.deliver(forged)
        assert status == 401


async def test_the_registry_copy_survives_a_restart_without_the_gateway(
    tmp_path: Path,
) -> None:
    from console.directory import Directory

    async with desk(tmp_path):
        pass
    offline = Directory(tmp_path / "console.db", None)
    assert offline.knows("bell-0001")
    assert offline.get("bell-0001") is not None
    assert offline.get("bell-0001").label == "test bell"  # type: ignore[union-attr]
    offline.close()


async def test_after_a_failed_sync_an_unknown_signer_asks_again_at_once(
    tmp_path: Path,
) -> None:
    from console.directory import Directory

    calls: list[int] = []
    entries = [registry_entry()]

    async def fetch() -> list[dict[str, object]]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionRefusedError("the gateway is not up yet")
        return entries

    directory = Directory(tmp_path / "c.db", fetch, min_refresh_gap_s=60)
    assert not await directory.sync()
    # within the gap, but the last sync failed: it asks again
    assert await directory.sync(force=False)
    # within the gap after a good sync: held back
    assert await directory.sync(force=False)
    assert len(calls) == 2
    directory.close()


async def test_a_signature_header_outside_ascii_is_a_wrong_signature_not_a_500(
    tmp_path: Path,
) -> None:
    """Unauthenticated, like issue 14's '²' timestamp: compare_digest refuses non-ASCII str."""
    async with desk(tmp_path) as d:
        body, headers = headers_for(delivery())
        headers[SIGNATURE_HEADER] = "²" * 64
        async with d.client.post("/events", data=body, headers=headers) as response:
            assert response.status == 401 and (await response.json())["error"] == "bad signature"
        assert d.console.receiver.events.count() == 0


async def test_a_signed_delivery_with_fields_of_the_wrong_kind_is_a_400(tmp_path: Path) -> None:
    """Even with the right HMAC (the gateway's, or its secret's thief): numbers are JSON
    whole numbers and ids fit their grammar before anything is kept, not a 500."""
    async with desk(tmp_path) as d:
        for tamper in (
            {"ts_ms": "²"},
            {"ts_ms": 1.5},
            {"ts_ms": True},
            {"event_id": "../../alerts"},
            {"device_id": "BELL/0001"},
            {"body": []},
        ):
            status, answer = await d.deliver(delivery(tamper=tamper))
            assert status == 400 and "malformed event" in answer["error"], (tamper, answer)
        assert d.console.receiver.events.count() == 0


async def test_a_cancel_or_an_id_of_another_devices_alert_is_refused(tmp_path: Path) -> None:
    """Defence in depth: the gateway refuses these already (issue 14.2)."""
    gateway = FakeGateway()
    gateway.devices.append(
        registry_entry("bell-0002", public_key=public_key_to_b64(OTHER_KEY.public_key()))
    )
    async with desk(tmp_path, gateway) as d:
        await d.console.receiver.directory.sync()  # type: ignore[union-attr]
        press = delivery()
        assert (await d.deliver(press))[0] == 200
        theirs = press["event_id"]
        cancel = delivery(Cancel(alert_id=theirs), device="bell-0002", key=OTHER_KEY)
        status, body = await d.deliver(cancel)
        assert status == 403 and "another device" in body["error"]
        linked = Alert(bell="emergency", trigger="duress", linked_to=theirs)
        status, _ = await d.deliver(delivery(linked, device="bell-0002", key=OTHER_KEY))
        assert status == 403
        # a fresh press of bell-0002 under bell-0001's alert id, signed as such
        reused = build_message(PRESS, device="bell-0002", seq=3, ts=now_ms(), id=theirs)
        token = seal(reused, Signer("bell-0002", OTHER_KEY))
        tamper = {"event_id": theirs, "ts_ms": reused.ts, "jws": token}
        status, _ = await d.deliver(delivery(device="bell-0002", key=OTHER_KEY, tamper=tamper))
        assert status == 403
        assert d.console.receiver.events.ids() == [theirs]
        # the owner's own cancel is kept
        own = delivery(Cancel(alert_id=theirs), seq=2)
        assert (await d.deliver(own))[0] == 200
