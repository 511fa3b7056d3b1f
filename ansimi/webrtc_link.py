"""A poor link for WebRTC in one process: drop and delay the datagrams aiortc sends.

netem needs a kernel module a container may not have; this shapes at the one place every
ICE datagram (STUN, DTLS, RTP, RTCP) of this process leaves: aioice's `send_data` and
`send_stun`. Each datagram is dropped with probability `loss`, else sent `delay_s` later
(so every hop, each way, sees the loss and the delay). For benchmarks and the simulator,
never for a real device or gateway: it is process-wide, like `enable_loopback_candidates`.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from aioice import ice


@dataclass
class LinkCounts:
    """What the imposed link did: datagrams offered to it, and those it dropped."""

    sent: int = 0
    dropped: int = 0


def impose_link(loss: float, delay_s: float, rng: random.Random | None = None) -> LinkCounts:
    """From now on, this process's WebRTC datagrams see `loss` (0..1) and `delay_s`; the
    counts returned grow as they do."""
    if not 0 <= loss < 1 or delay_s < 0:
        raise ValueError(f"loss must be in [0, 1) and delay >= 0, not {loss}, {delay_s}")
    chance = rng or random.Random()
    counts = LinkCounts()

    def later(protocol: Any, data: bytes, addr: tuple[str, int]) -> None:
        counts.sent += 1
        if chance.random() < loss:
            counts.dropped += 1
            return
        transport = protocol.transport
        if transport is None:
            return

        def send() -> None:
            if not transport.is_closing():
                transport.sendto(data, addr)

        asyncio.get_running_loop().call_later(delay_s, send)

    async def send_data(self: Any, data: bytes, addr: tuple[str, int]) -> None:
        later(self, data, addr)

    def send_stun(self: Any, message: Any, addr: tuple[str, int]) -> None:
        later(self, bytes(message), addr)

    ice.StunProtocol.send_data = send_data  # type: ignore[method-assign]
    ice.StunProtocol.send_stun = send_stun  # type: ignore[method-assign]
    return counts
