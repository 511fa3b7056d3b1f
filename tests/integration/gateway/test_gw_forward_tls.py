"""Forwarding with real parts: mosquitto, the gateway, HTTPS with a real TLS handshake.

The centre's certificate is issued for 127.0.0.1 by a CA made here with `cryptography`;
the gateway trusts that CA through the centre's `ca_file` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from ansimi_testkit import eventually
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ansimi.broker import Mosquitto, free_port
from ansimi.mqtt import Message, Session, Settings
from console.receiver import EventLog, Receiver
from gateway.config import Centre, ForwardConfig, GatewayConfig, MqttConfig, SiaReceiver
from gateway.service import Gateway
from gateway.store import Delivery, Device
from gateway.transports.https import HttpsCentre, delivery_body
from protocol.clock import wall_ms
from protocol.envelope import open_for_device, seal
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    signature_matches,
)
from protocol.jws import Signer
from protocol.keys import generate_key, public_key_to_b64
from protocol.messages import AckMessage, Alert, build_message
from protocol.topics import up_topic

SECRET = "centre-secret-for-tests"
WAIT_S = 30.0  # two shared cores: generous, and still bounded
DEVICE = "bell-0001"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_server_cert(folder: Path, cn: str = "test centre CA") -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signs for 127.0.0.1; returns (ca, cert, key) files."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.crt", folder / "server.crt", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@contextlib.asynccontextmanager
async def https_centre(receiver: Receiver, port: int, cert: Path, key: Path) -> AsyncIterator[None]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    try:
        yield
    finally:
        await runner.cleanup()


@dataclass
class Phone:
    """A device's MQTT side, without the agent: publishes signed alerts, collects acks."""

    session: Session
    signer: Signer
    gateway_key: object
    acks: list[tuple[str, str]] = field(default_factory=list)
    seq: int = 0

    def on_message(self, message: Message) -> None:
        opened = open_for_device(
            message.payload,
            lambda kid: self.gateway_key,  # type: ignore[arg-type,return-value]
            DEVICE,
        )
        assert isinstance(opened.message, AckMessage)
        self.acks.append((opened.message.body.ref, opened.message.body.stage))

    async def alert(self) -> str:
        self.seq += 1
        msg = build_message(
            Alert(bell="emergency", trigger="press"),
            device=DEVICE,
            seq=self.seq,
            ts=wall_ms(),
        )
        await self.session.publish(up_topic(DEVICE, "alert"), seal(msg, self.signer).encode())
        return msg.id

    def stage(self, stage: str) -> set[str]:
        return {ref for ref, s in self.acks if s == stage}


@contextlib.asynccontextmanager
async def gateway_and_phone(
    tmp_path: Path,
    broker: Mosquitto,
    centre: Centre | None = None,
    sia: list[SiaReceiver] | None = None,
) -> AsyncIterator[tuple[Gateway, Phone]]:
    gateway_signer = Signer("gw-test", generate_key())
    config = GatewayConfig(
        id="gw-test",
        database=tmp_path / "gateway" / "gateway.db",
        mqtt=MqttConfig(host=broker.host, port=broker.port),
        # short waits so that the test sees backoff and the circuit in seconds
        forward=ForwardConfig(
            timeout_s=2.0,
            backoff_min_s=0.05,
            backoff_max_s=0.5,
            breaker_failures=3,
            breaker_open_s=0.3,
        ),
        centres=[centre] if centre else [],
        sia=sia or [],
    )
    gateway = Gateway(config, signer=gateway_signer)
    device_key = generate_key()
    await gateway.store.add_device(
        Device(DEVICE, public_key_to_b64(device_key.public_key()), "bell", "mapo"), now_ms=0
    )
    await gateway.registry.reload()
    phone = Phone(
        Session(Settings(broker.host, broker.port, client_id=DEVICE), lambda m: None),
        Signer(DEVICE, device_key),
        gateway_signer.public_key,
    )
    phone.session._on_message = phone.on_message
    tasks = [asyncio.ensure_future(gateway.run()), asyncio.ensure_future(phone.session.run())]
    try:
        await asyncio.wait_for(gateway.ready.wait(), WAIT_S)
        await phone.session.wait_connected(WAIT_S)
        await phone.session.subscribe([(f"ansimi/v1/{DEVICE}/down/#", 1)])
        yield gateway, phone
    finally:
        await phone.session.close()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def gauge(gateway: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_a_centre_down_for_a_while_then_up_over_tls_receives_everything(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    port = free_port()
    centre = Centre(
        name="central", url=f"https://127.0.0.1:{port}/events", secret=SECRET, ca_file=ca
    )
    receiver = Receiver(SECRET, EventLog(tmp_path / "centre.db"))
    async with gateway_and_phone(tmp_path, mosquitto, centre) as (gateway, phone):
        sent = {await phone.alert() for _ in range(20)}
        # kept and acked `received` although no centre answers
        await eventually(lambda: phone.stage("received") == sent)
        await eventually(lambda: gauge(gateway, "ansimi_forward_waiting") == 20)
        assert gauge(gateway, "ansimi_forward_waiting_by_centre", {"centre": "central"}) == 20
        waiting = gateway.store.database.waiting(100, centre="central")
        assert {w.event_id for w in waiting} == sent
        await eventually(lambda: gateway.forwarder.breaker("central").state.name == "OPEN")
        assert not phone.stage("delivered")

        async with https_centre(receiver, port, cert, key):
            await eventually(lambda: receiver.events.count() == 20)
            await eventually(lambda: phone.stage("delivered") == sent)
            await eventually(lambda: gauge(gateway, "ansimi_forward_waiting") == 0)
        assert set(receiver.events.ids()) == sent
        assert receiver.refused == 0
        # one `delivered` per alert, however many centres and attempts
        assert len([1 for _, s in phone.acks if s == "delivered"]) == 20
        assert gateway.forwarder.breaker("central").state.name == "CLOSED"
    receiver.events.close()


async def test_a_centre_whose_certificate_our_ca_did_not_sign_gets_nothing(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    trusted_ca, _, _ = make_ca_and_server_cert(tmp_path / "ours")
    _, cert, key = make_ca_and_server_cert(tmp_path / "impostor", cn="another CA")
    port = free_port()
    centre = Centre(
        name="central", url=f"https://127.0.0.1:{port}/events", secret=SECRET, ca_file=trusted_ca
    )
    receiver = Receiver(SECRET, EventLog(tmp_path / "centre.db"))
    async with (
        https_centre(receiver, port, cert, key),
        gateway_and_phone(tmp_path, mosquitto, centre) as (gateway, phone),
    ):
        event_id = await phone.alert()
        await eventually(
            lambda: bool(gateway.store.database.waiting(1)) and bool(phone.stage("received"))
        )
        await eventually(lambda: (gateway.store.database.waiting(1)[0].last_error or "") != "")
        (waiting,) = gateway.store.database.waiting(10)
        assert waiting.event_id == event_id
        assert "certificate" in (waiting.last_error or "").lower()
        assert receiver.events.count() == 0
        assert not phone.stage("delivered")
    receiver.events.close()


async def test_how_each_answer_of_a_centre_is_taken(tmp_path: Path) -> None:
    """2xx delivered; 4xx refused for good except 408 and 429; 5xx and no answer retried."""
    answers = iter(
        [
            web.Response(status=201),
            web.Response(status=401),
            web.Response(status=404),
            web.Response(status=408),
            web.Response(status=429, headers={"Retry-After": "7"}),
            web.Response(status=503),
        ]
    )
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return next(answers)

    app = web.Application()
    app.router.add_post("/events", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    centre = Centre(name="central", url=f"http://127.0.0.1:{port}/events", secret=SECRET)
    transport = HttpsCentre(centre, ForwardConfig(timeout_s=2.0), lambda: 1_800_000_000_000)
    press = build_message(Alert(bell="emergency", trigger="press"), device=DEVICE, seq=1, ts=0)
    token = seal(press, Signer(DEVICE, generate_key()))
    delivery = Delivery(press.id, "central", 0, DEVICE, "alert", 0, '{"trigger":"press"}', token)
    try:
        try:
            outcomes = [await transport.send(delivery, "mapo") for _ in range(6)]
        finally:
            await runner.cleanup()
        unreachable = await transport.send(delivery, "mapo")  # nobody listens any more
    finally:
        await transport.aclose()
    assert [(o.ok, o.permanent) for o in outcomes] == [
        (True, False),
        (False, True),
        (False, True),
        (False, False),
        (False, False),
        (False, False),
    ]
    assert outcomes[4].retry_after_ms == 7_000
    assert not unreachable.ok and not unreachable.permanent
    # every attempt carries the idempotency key and a signature a centre can check
    body = delivery_body(delivery, "mapo")
    for headers in seen:
        assert headers[IDEMPOTENCY_HEADER] == press.id
        assert signature_matches(SECRET, headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
