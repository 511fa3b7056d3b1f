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
from typing import Any

from aioice import ice


def impose_link(loss: float, delay_s: float, rng: random.Random | None = None) -> None:
    """From now on, this process's WebRTC datagrams see `loss` (0..1) and `delay_s`."""
    if not 0 <= loss < 1 or delay_s < 0:
        raise ValueError(f"loss must be in [0, 1) and delay >= 0, not {loss}, {delay_s}")
    chance = rng or random.Random()

    def later(protocol: Any, data: bytes, addr: tuple[str, int]) -> None:
        if chance.random() < loss:
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
