"""Helpers for the provisioning broker tests: identities from the site CA, running sessions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from ansimi.broker import Mosquitto
from ansimi.mqtt import Message, Session, Settings, TlsFiles
from siteca import pki
from siteca.site import Site


@dataclass
class Client:
    """A running Session that records what it receives and each time it is dropped."""

    session: Session
    inbox: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    drops: int = 0

    async def nothing_more(self, within_s: float = 0.5) -> None:
        """Nothing arrives within `within_s`: only where no later message can reach this
        client (a revoked identity reads nothing). Elsewhere, send a message after what must
        not arrive and check it comes first: the broker keeps one subscriber's order."""
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(self.inbox.get(), within_s)
            raise AssertionError(f"unexpected message on {extra.topic}: {extra.payload!r}")


class Identities:
    """Issues client certificates from the site's CA (or any CA) into files for TlsFiles."""

    def __init__(self, site: Site, where: Path) -> None:
        self.site = site
        self.where = where
        where.mkdir(exist_ok=True)

    def device(
        self,
        cn: str,
        *,
        ca: pki.CertAuthority | None = None,
        tag: str = "",
        key: pki.PrivateKey | None = None,
    ) -> TlsFiles:
        key = key if key is not None else pki.generate_key()
        if ca is None:
            cert = self.site.issue_client_cert(cn, key.public_key())
        else:
            cert = pki.issue_client_cert(ca, cn, key.public_key())
        stem = self.where / f"{cn}{tag}-{cert.serial_number:X}"
        pki.write_private_key(stem.with_suffix(".key"), key)
        pki.write_cert(stem.with_suffix(".crt"), cert)
        return TlsFiles(
            self.site.layout.ca_cert, stem.with_suffix(".crt"), stem.with_suffix(".key")
        )

    def gateway(self) -> TlsFiles:
        lay = self.site.layout
        return TlsFiles(lay.gateway_ca, lay.gateway_cert, lay.gateway_tls_key)

    def no_certificate(self) -> TlsFiles:
        return TlsFiles(self.site.layout.ca_cert)


def settings(broker: Mosquitto, tls: TlsFiles, client_id: str, version: int = 5) -> Settings:
    """Fast reconnects, so a refused client retries (and is refused) many times per test."""
    return Settings(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        version=5 if version == 5 else 311,
        tls=tls,
        persistent=False,
        connect_timeout_s=2.0,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings, *, connect: bool = True) -> AsyncIterator[Client]:
    """Run a Session; with `connect`, wait until it is connected."""
    box: list[Client] = []

    def on_message(message: Message) -> None:
        box[0].inbox.put_nowait(message)

    def on_disconnect() -> None:
        box[0].drops += 1

    session = Session(settings, on_message, on_disconnect=on_disconnect)
    client = Client(session)
    box.append(client)
    task = asyncio.create_task(session.run())
    try:
        if connect:
            await session.wait_connected(5)
        yield client
    finally:
        await session.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for_log(broker: Mosquitto, text: str, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while text not in broker.log_file.read_text(errors="replace"):
        if loop.time() > deadline:
            raise AssertionError(f"{text!r} not in the broker log:\n{broker.log_tail()}")
        await asyncio.sleep(0.05)
