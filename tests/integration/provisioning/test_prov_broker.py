"""A site's broker security against a real mosquitto: mutual TLS, the ACL, revocation.

Under MQTT 3.1.1 a denied publish is acknowledged like any other and a denied subscribe is
granted, so the ACL tests assert that nothing arrives at the would-be receiver, after
proving that a permitted message on the same path does arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prov_broker_kit import Client, Identities, running, settings, wait_for_log

from ansimi.broker import Mosquitto, free_port
from ansimi.mqtt import MqttError, TlsFiles
from protocol.jws import MAX_TOKEN_BYTES
from protocol.probe import probe_topic
from protocol.topics import MAX_PACKET_BYTES
from provisioning.diagnostic import issue_diagnostic
from provisioning.revoke import SETTLE_S, RevokeResult, SignalBroker, revoke_certificate
from siteca import pki
from siteca.broker_conf import current_user
from siteca.errors import BrokerControlError, InvalidName
from siteca.site import Site, init_site

VERSIONS = [pytest.param(5, id="v5"), pytest.param(311, id="v311")]
UP_ALL = "ansimi/v1/+/up/#"


def up(device: str, kind: str = "alert") -> str:
    return f"ansimi/v1/{device}/up/{kind}"


def down(device: str, kind: str = "ack") -> str:
    return f"ansimi/v1/{device}/down/{kind}"


@contextlib.asynccontextmanager
async def gateway_and_devices(
    broker: Mosquitto,
    ids: Identities,
    *device_ids: str,
    version: int = 5,
    tls_for: Mapping[str, TlsFiles] | None = None,
) -> AsyncIterator[list[Client]]:
    """The gateway, then each device under its own id, connected one after another. A device
    named in `tls_for` connects with that certificate instead of a new one from the site CA."""
    tls_for = tls_for or {}
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                running(settings(broker, ids.gateway(), "gateway", version))
            )
        ]
        for device_id in device_ids:
            tls = tls_for[device_id] if device_id in tls_for else ids.device(device_id)
            clients.append(
                await stack.enter_async_context(running(settings(broker, tls, device_id, version)))
            )
        yield clients


async def receive(client: Client, timeout_s: float = 5.0) -> tuple[str, bytes]:
    message = await asyncio.wait_for(client.inbox.get(), timeout_s)
    return message.topic, message.payload


async def payloads_until(client: Client, last: bytes) -> list[bytes]:
    """What reaches `client` up to and including the payload `last`."""
    arrived: list[bytes] = []
    while not arrived or arrived[-1] != last:
        arrived.append((await receive(client))[1])
    return arrived


async def publish_denied(client: Client, topic: str, payload: bytes, version: int) -> None:
    """Publish where the ACL forbids it: v5 says so, 3.1.1 acknowledges and drops it."""
    sent = client.session.publish(topic, payload)
    if version == 5:
        with pytest.raises(MqttError, match="Not authorized"):
            await asyncio.wait_for(sent, 5)
    else:
        await asyncio.wait_for(sent, 5)


async def revoke_and_reload(
    broker: Mosquitto, site: Site, serial_or_cn: str, *, kick: bool = True, reason: str = ""
) -> RevokeResult:
    """Revoke on the site and have the test broker reload (and, with `kick`, drop the revoked
    client) by signal, as `ansimi provision revoke --pid-file` does."""
    assert broker.process is not None
    return await asyncio.to_thread(
        revoke_certificate,
        site.layout.root,
        serial_or_cn,
        broker=SignalBroker(broker.process.pid),
        kick=kick,
        reason=reason,
    )


async def until_disconnected(client: Client, limit_s: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while client.session.connected:
        assert loop.time() - start < limit_s, f"still connected after {limit_s}s"
        await asyncio.sleep(0.02)
    return loop.time() - start


# ---- who may connect -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_device_publishes_its_up_and_the_gateway_receives_it_and_acks(
    broker: Mosquitto, ids: Identities, version: int
) -> None:
    async with gateway_and_devices(broker, ids, "bell-0001", version=version) as (gw, dev):
        assert await gw.session.subscribe([(UP_ALL, 1)]) == [1]
        await dev.session.subscribe([("ansimi/v1/bell-0001/down/#", 1)])
        await asyncio.wait_for(dev.session.publish(up("bell-0001"), b"help"), 5)
        assert await receive(gw) == (up("bell-0001"), b"help")
        await asyncio.wait_for(gw.session.publish(down("bell-0001"), b"received"), 5)
        assert await receive(dev) == (down("bell-0001"), b"received")


@pytest.mark.parametrize("version", VERSIONS)
async def test_gateway_receives_through_a_shared_subscription(
    broker: Mosquitto, ids: Identities, version: int
) -> None:
    # mosquitto checks read access on each delivered message's topic, so the gateway's
    # `topic read ansimi/v1/+/up/#` also covers $share/<group>/ansimi/v1/+/up/#
    async with gateway_and_devices(broker, ids, "bell-0001", version=version) as (gw, dev):
        await gw.session.subscribe([(f"$share/gateways/{UP_ALL}", 1)])
        await asyncio.wait_for(dev.session.publish(up("bell-0001"), b"help"), 5)
        assert await receive(gw) == (up("bell-0001"), b"help")


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_gateway_hears_its_own_probe_and_a_device_cannot_send_one(
    broker: Mosquitto, site: Site, ids: Identities, version: int
) -> None:
    probe = probe_topic(site.gateway_id)
    async with gateway_and_devices(broker, ids, "bell-0001", version=version) as (gw, dev):
        await gw.session.subscribe([(f"$share/gateways/{UP_ALL}", 1)])
        await publish_denied(dev, probe, b"forged probe", version)
        await asyncio.wait_for(gw.session.publish(probe, b"probe"), 5)
        # same subscriber: had the forgery gone through it would be first
        assert await receive(gw) == (probe, b"probe")


async def test_a_certificate_from_another_ca_is_refused(broker: Mosquitto, ids: Identities) -> None:
    stranger = ids.device("bell-0001", ca=pki.create_ca("othersite"))
    async with running(settings(broker, stranger, "bell-0001"), connect=False) as client:
        # the client keeps retrying while we wait: on a loaded machine one handshake can
        # outlast the client's 2 s connect timeout, and the broker then logs only an EOF
        await wait_for_log(broker, "certificate verify failed", timeout_s=15)
        with pytest.raises(TimeoutError):
            await client.session.wait_connected(1)


async def test_a_client_without_a_certificate_is_refused(
    broker: Mosquitto, ids: Identities
) -> None:
    async with running(settings(broker, ids.no_certificate(), "anon"), connect=False) as client:
        await wait_for_log(broker, "peer did not return a certificate", timeout_s=15)
        with pytest.raises(TimeoutError):
            await client.session.wait_connected(1)


# ---- what a device may do --------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_device_cannot_publish_on_another_devices_up_topic(
    broker: Mosquitto, ids: Identities, version: int
) -> None:
    async with gateway_and_devices(broker, ids, "bell-0001", version=version) as (gw, a):
        await gw.session.subscribe([(UP_ALL, 1)])
        await publish_denied(a, up("bell-0002"), b"forged", version)
        await asyncio.wait_for(a.session.publish(up("bell-0001"), b"proof"), 5)
        # same publisher, same subscriber: had the forgery gone through it would be first
        assert await receive(gw) == (up("bell-0001"), b"proof")


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_device_cannot_forge_gateway_messages_to_another_device(
    broker: Mosquitto, ids: Identities, version: int
) -> None:
    async with (
        gateway_and_devices(broker, ids, "bell-0001", "bell-0002", version=version) as (gw, a, b),
    ):
        await b.session.subscribe([("ansimi/v1/bell-0002/down/#", 1)])
        await publish_denied(a, down("bell-0002"), b"fake ack", version)
        await publish_denied(a, down("bell-0001"), b"own down is read-only", version)
        await asyncio.wait_for(gw.session.publish(down("bell-0002"), b"real ack"), 5)
        assert await receive(b) == (down("bell-0002"), b"real ack")


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_device_reads_nothing_but_its_own_down_topic(
    broker: Mosquitto, ids: Identities, version: int
) -> None:
    async with (
        gateway_and_devices(broker, ids, "bell-0001", "bell-0002", version=version) as (gw, a, b),
    ):
        await gw.session.subscribe([(UP_ALL, 1)])
        await b.session.subscribe([("ansimi/v1/bell-0002/down/#", 1)])
        sneaky = [
            "ansimi/v1/bell-0002/down/#",
            "ansimi/v1/+/down/#",
            UP_ALL,
            f"$share/sneak/{UP_ALL}",
            "#",
        ]
        # mosquitto grants every subscription; it filters on delivery
        granted = await a.session.subscribe([(f, 1) for f in sneaky])
        assert granted == [1] * len(sneaky)
        await a.session.subscribe([("ansimi/v1/bell-0001/down/#", 1)])

        await asyncio.wait_for(b.session.publish(up("bell-0002"), b"b's alert"), 5)
        assert await receive(gw) == (up("bell-0002"), b"b's alert")
        await asyncio.wait_for(gw.session.publish(down("bell-0002"), b"b's ack"), 5)
        assert await receive(b) == (down("bell-0002"), b"b's ack")
        await asyncio.wait_for(gw.session.publish(down("bell-0001"), b"a's ack"), 5)

        # a's own message arrives (once per matching subscription), and nothing of b's
        assert await receive(a) == (down("bell-0001"), b"a's ack")
        while True:
            try:
                extra = await asyncio.wait_for(a.inbox.get(), 0.5)
            except TimeoutError:
                break
            assert (extra.topic, extra.payload) == (down("bell-0001"), b"a's ack")


async def test_a_device_cannot_take_over_another_by_its_client_id(
    broker: Mosquitto, ids: Identities
) -> None:
    async with gateway_and_devices(broker, ids, "bell-0002") as (gw, b):
        await gw.session.subscribe([(UP_ALL, 1)])
        # bell-0001 claims bell-0002's client id; the broker uses its certificate CN instead
        async with running(settings(broker, ids.device("bell-0001"), "bell-0002")) as a:
            await asyncio.wait_for(a.session.publish(up("bell-0001"), b"a"), 5)
            assert await receive(gw) == (up("bell-0001"), b"a")
            # a round trip of b's after a's connect: had a taken b's session over, b's
            # socket was closed first, and this publish goes out only after a reconnect
            await asyncio.wait_for(b.session.publish(up("bell-0002"), b"b"), 5)
            assert await receive(gw) == (up("bell-0002"), b"b")
            assert b.session.connected and b.drops == 0
        await asyncio.wait_for(b.session.publish(up("bell-0002"), b"b"), 5)
        assert await receive(gw) == (up("bell-0002"), b"b")


# ---- revocation ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_revoked_device_is_cut_off_within_10s_and_refused_after(
    broker: Mosquitto, ids: Identities, site: Site, version: int
) -> None:
    a_tls = ids.device("bell-0001")
    async with gateway_and_devices(
        broker, ids, "bell-0001", "bell-0002", version=version, tls_for={"bell-0001": a_tls}
    ) as (gw, a, b):
        await gw.session.subscribe([(UP_ALL, 1)])
        await asyncio.wait_for(a.session.publish(up("bell-0001"), b"before"), 5)
        assert await receive(gw) == (up("bell-0001"), b"before")

        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await revoke_and_reload(broker, site, "bell-0001", reason="test")
        assert result.reloaded and result.kicked == ["bell-0001"], result.warnings
        assert result.complete
        await until_disconnected(a, 10.0)
        assert loop.time() - start < 10.0

        # it keeps reconnecting (every 50-200 ms here) and is refused every time
        refused = a.session.failed_connects
        async with asyncio.timeout(10):
            while a.session.failed_connects < refused + 3:
                await asyncio.sleep(0.02)
        assert not a.session.connected
        # nobody else was disturbed, and the gateway still reads everyone
        assert (b.drops, gw.drops) == (0, 0)
        await asyncio.wait_for(b.session.publish(up("bell-0002"), b"still here"), 5)
        assert await receive(gw) == (up("bell-0002"), b"still here")

    async with running(settings(broker, a_tls, "bell-0001", version), connect=False) as again:
        with pytest.raises(TimeoutError):
            await again.session.wait_connected(2)


@pytest.mark.parametrize("version", VERSIONS)
async def test_reload_alone_keeps_a_live_connection_but_the_acl_silences_it(
    broker: Mosquitto, ids: Identities, site: Site, version: int
) -> None:
    """What mosquitto 2.0.11 does on SIGHUP, and why revocation also kicks the client."""
    async with (
        gateway_and_devices(broker, ids, "bell-0001", "bell-0002", version=version) as (gw, a, b),
    ):
        await gw.session.subscribe([(UP_ALL, 1)])
        await a.session.subscribe([("ansimi/v1/bell-0001/down/#", 1)])
        result = await revoke_and_reload(broker, site, "bell-0001", kick=False)
        assert result.reloaded and result.kicked == []
        # the re-read ACL denies the identity everything at once (and b's proof, sent
        # after, arrives first: a's publish was dropped)...
        await publish_denied(a, up("bell-0001"), b"after revocation", version)
        await asyncio.wait_for(b.session.publish(up("bell-0002"), b"proof"), 5)
        assert await receive(gw) == (up("bell-0002"), b"proof")
        # ...while the CRL, re-read too, is never checked against a TLS session already
        # open: a's publish was answered on the connection it had before the reload
        assert a.session.connected and a.drops == 0
        await asyncio.wait_for(gw.session.publish(down("bell-0001"), b"ack"), 5)
        await a.nothing_more()


async def test_revoking_one_serial_leaves_the_reenrolled_identity_working(
    broker: Mosquitto, ids: Identities, site: Site
) -> None:
    old = ids.device("bell-0001", tag="-old")
    new = ids.device("bell-0001", tag="-new")
    assert old.cert_file is not None
    serial = pki.read_cert(old.cert_file).serial_number
    async with (
        gateway_and_devices(broker, ids, "bell-0001", tls_for={"bell-0001": old}) as (gw, stale),
    ):
        await gw.session.subscribe([(UP_ALL, 1)])
        result = await revoke_and_reload(broker, site, f"serial:{serial:X}")
        assert result.denied_identities == [] and result.kicked == ["bell-0001"]
        await until_disconnected(stale, 10.0)
        async with running(settings(broker, new, "bell-0001")) as fresh:
            await asyncio.wait_for(fresh.session.publish(up("bell-0001"), b"new cert"), 5)
            assert await receive(gw) == (up("bell-0001"), b"new cert")
            assert not stale.session.connected


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])
    raise AssertionError("no Uid line")


def _has_broker_user() -> bool:
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(
    os.geteuid() != 0 or not _has_broker_user(),
    reason="needs root and a 'mosquitto' user: the broker must drop privileges as in production",
)
async def test_as_root_the_broker_drops_to_mosquitto_and_reload_is_guarded() -> None:
    # pytest's tmp_path is private to root; a production-like site needs traversable parents
    base = Path(tempfile.mkdtemp(prefix="ansimi-prov-test-", dir="/tmp"))
    base.chmod(0o755)
    server: Mosquitto | None = None
    try:
        init_site(base / "site", site="prod", listen_host="127.0.0.1", port=free_port())
        site = Site.open(base / "site")
        ids = Identities(site, base / "identities")
        # no run_as: started by root, mosquitto drops to user `mosquitto`
        server = Mosquitto(site.broker_config(state_dir=site.layout.broker.data_dir))
        server.start()
        assert server.process is not None
        pid = server.process.pid
        assert _uid_of(pid) == pwd.getpwnam("mosquitto").pw_uid
        control = SignalBroker(pid)

        async with gateway_and_devices(server, ids, "bell-0001", "bell-0002") as (gw, a, b):
            await gw.session.subscribe([(UP_ALL, 1)])
            result = await asyncio.to_thread(
                revoke_certificate, site.layout.root, "bell-0001", broker=control
            )
            assert result.complete
            await until_disconnected(a, 10.0)
            # re-read as user mosquitto: the gateway's grants and the device patterns hold
            await asyncio.wait_for(b.session.publish(up("bell-0002"), b"ok"), 5)
            assert await receive(gw) == (up("bell-0002"), b"ok")

            # a broker that could not read its files must not be reloaded: mosquitto 2.0.11
            # would then run without an ACL, letting anyone publish anywhere
            site.layout.broker_dir.chmod(0o700)
            with pytest.raises(BrokerControlError, match="cannot enter"):
                await asyncio.to_thread(
                    revoke_certificate, site.layout.root, "bell-0002", broker=control
                )
            await publish_denied(b, up("bell-0009"), b"forged", 5)
            await asyncio.wait_for(b.session.publish(up("bell-0002"), b"proof"), 5)
            assert await receive(gw) == (up("bell-0002"), b"proof")

            # fixed, the same command finishes the job
            site.layout.broker_dir.chmod(0o750)
            result = await asyncio.to_thread(
                revoke_certificate, site.layout.root, "bell-0002", broker=control
            )
            assert result.complete and result.kicked == ["bell-0002"]
            await until_disconnected(b, 10.0)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


# ---- key types and TLS versions --------------------------------------------------------------


def _mqtt_connect_over_tls(host: str, port: int, tls: TlsFiles, version: ssl.TLSVersion) -> str:
    """One MQTT 3.1.1 CONNECT over a TLS connection pinned to `version`; returns the version
    negotiated after checking the CONNACK says accepted."""
    context = tls.context()
    context.minimum_version = context.maximum_version = version
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as conn,
    ):
        client_id = b"tls-probe"
        body = b"\x00\x04MQTT\x04\x02\x00\x0a" + len(client_id).to_bytes(2, "big") + client_id
        conn.sendall(bytes([0x10, len(body)]) + body)
        assert conn.recv(4) == b"\x20\x02\x00\x00"  # CONNACK, return code 0: accepted
        negotiated = conn.version()
        assert negotiated is not None
        return negotiated


@pytest.mark.parametrize("tls_version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_ed25519_client_certificates_work_over_tls_1_2_and_1_3(
    broker: Mosquitto, ids: Identities, tls_version: ssl.TLSVersion
) -> None:
    negotiated = await asyncio.to_thread(
        _mqtt_connect_over_tls, broker.host, broker.port, ids.device("bell-0001"), tls_version
    )
    assert (
        negotiated
        == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[tls_version]
    )


async def test_a_p256_site_takes_p256_and_ed25519_devices(tmp_path: Path) -> None:
    init_site(
        tmp_path / "p256", site="p256", listen_host="127.0.0.1", port=free_port(), key_type="p256"
    )
    site = Site.open(tmp_path / "p256")
    assert isinstance(site.ca().key, ec.EllipticCurvePrivateKey)
    ids = Identities(site, tmp_path / "identities")
    server = Mosquitto(site.broker_config(state_dir=tmp_path / "state", run_as=current_user()))
    server.start()
    try:
        p256_device = ids.device("bell-0001", key=pki.generate_key("p256"))
        async with gateway_and_devices(
            server, ids, "bell-0001", "bell-0002", tls_for={"bell-0001": p256_device}
        ) as (gw, a, b):
            await gw.session.subscribe([(UP_ALL, 1)])
            await asyncio.wait_for(a.session.publish(up("bell-0001"), b"p256"), 5)
            assert await receive(gw) == (up("bell-0001"), b"p256")
            await asyncio.wait_for(b.session.publish(up("bell-0002"), b"ed25519"), 5)
            assert await receive(gw) == (up("bell-0002"), b"ed25519")
    finally:
        server.stop()


# ---- message size ----------------------------------------------------------------------------


async def test_the_broker_drops_a_payload_bigger_than_the_gateway_reads(
    broker: Mosquitto, ids: Identities, tmp_path: Path
) -> None:
    """`mosquitto_pub` of an oversize payload with a device's own certificate: the broker
    drops it (max_packet_size from protocol's limit), while one at the limit passes."""
    tls = ids.device("bell-0007")
    async with gateway_and_devices(broker, ids) as (gw,):
        await gw.session.subscribe([(UP_ALL, 1)])

        async def mosquitto_pub(size: int) -> None:
            payload = tmp_path / f"payload-{size}"
            payload.write_bytes(b"x" * size)
            process = await asyncio.create_subprocess_exec(
                "mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5",
                "-i", "bell-0007", "--cafile", str(tls.ca_file), "--cert", str(tls.cert_file),
                "--key", str(tls.key_file), "-q", "1", "-t", up("bell-0007"), "-f", str(payload),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            async with asyncio.timeout(10):
                await process.wait()

        await mosquitto_pub(MAX_TOKEN_BYTES)
        topic, payload = await receive(gw)
        assert topic == up("bell-0007") and len(payload) == MAX_TOKEN_BYTES
        await mosquitto_pub(10 * 1024 * 1024)
        await mosquitto_pub(MAX_PACKET_BYTES + 1)
        # sent after both: had either gone through, it would reach the gateway first
        await mosquitto_pub(MAX_TOKEN_BYTES - 1)
        topic, payload = await receive(gw)
        assert topic == up("bell-0007") and len(payload) == MAX_TOKEN_BYTES - 1


# ---- an installer's diagnostic identity --------------------------------------------------------


async def _mosquitto(tool: str, tls: TlsFiles, broker: Mosquitto, *args: str) -> Any:
    return await asyncio.create_subprocess_exec(
        tool, "-h", broker.host, "-p", str(broker.port), "-V", "mqttv5", "--cafile",
        str(tls.ca_file), "--cert", str(tls.cert_file), "--key", str(tls.key_file), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip


async def test_a_diagnostic_identity_reads_everything_and_knocks_no_bell_off(
    broker: Mosquitto, ids: Identities, site: Site, tmp_path: Path
) -> None:
    issued = issue_diagnostic(site.layout.root, "kim", tmp_path / "diag")
    broker.reload()
    await asyncio.sleep(SETTLE_S)
    diag = TlsFiles(issued.ca_file, issued.cert_file, issued.key_file)
    bell_tls = ids.device("bell-0001")
    async with gateway_and_devices(broker, ids, "bell-0001", tls_for={"bell-0001": bell_tls}) as (
        gw,
        bell,
    ):
        await gw.session.subscribe([(UP_ALL, 1)])
        await bell.session.subscribe([(down("bell-0001"), 1)])
        # the installer watches, even claiming the bell's client id: the broker uses the CN
        watcher = await _mosquitto(
            "mosquitto_sub", diag, broker, "-i", "bell-0001", "-C", "1", "-W", "20", "-t", UP_ALL
        )
        # the bell presses until the watcher (which says nothing when it is subscribed) sees it
        async with asyncio.timeout(20):
            while watcher.returncode is None:
                await asyncio.wait_for(bell.session.publish(up("bell-0001"), b"press"), 5)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wait(), 0.3)
        assert (await watcher.stdout.read()).strip() == b"press"  # type: ignore[union-attr]
        assert bell.session.connected and bell.drops == 0
        assert await receive(gw) == (up("bell-0001"), b"press")
        # it never publishes: not as the bell, not to the bell, not on its own topics
        for topic in (up("bell-0001"), down("bell-0001"), up("diag-kim")):
            publisher = await _mosquitto("mosquitto_pub", diag, broker, "-q", "1", "-t", topic,
                                         "-m", "forged")  # fmt: skip
            async with asyncio.timeout(10):
                await publisher.wait()
        # each forgery was acknowledged before these were sent: anything forwarded of
        # them reaches the gateway and the bell before these
        await asyncio.wait_for(bell.session.publish(up("bell-0001"), b"after"), 5)
        await asyncio.wait_for(gw.session.publish(down("bell-0001"), b"after"), 5)
        for client in (gw, bell):
            arrived = await payloads_until(client, b"after")
            assert b"forged" not in arrived  # only the bell's own presses reached anyone
        assert bell.drops == 0
        # what the docs warn against: watching with the bell's own certificate drops the bell
        intruder = await _mosquitto("mosquitto_sub", bell_tls, broker, "-C", "1", "-W", "2",
                                    "-t", down("bell-0001"))  # fmt: skip
        async with asyncio.timeout(10):
            await intruder.wait()
        assert bell.drops >= 1


def test_no_device_may_be_called_like_a_diagnostic_identity(site: Site) -> None:
    with pytest.raises(InvalidName, match="reserved for diagnostic"):
        site.issue_client_cert("diag-kim", pki.generate_key().public_key())
