"""Protocol hot path against the bare Ed25519 primitive it wraps.

seal() is dump + sign; open_from_device() is verify + parse + the topic checks. The baseline
signs and verifies the same payload bytes with `cryptography` directly, so the ratio shows
what the envelope costs on top of the signature itself, on whatever machine runs it.

Run: .venv/bin/python bench/protocol.py   (last line: one JSON object)
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, this file's own directory leads sys.path, and this file (also named
# "protocol") would shadow the package it measures.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from protocol import (  # noqa: E402
    Alert,
    Signer,
    build_message,
    dump_message,
    open_from_device,
    parse_message,
    parse_topic,
    seal,
    up_topic,
    verify,
)

ROUNDS = 5
ROUND_S = 0.12  # 8 measurements x 5 rounds x 0.12 s: about 5 s in all


def rate(fn: Callable[[], object]) -> float:
    """Best-of-ROUNDS calls per second; the best round is the one least disturbed."""
    batch = 1
    while True:  # size a batch to about a hundredth of a round, so timer calls stay negligible
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        if time.perf_counter() - start > ROUND_S / 100:
            break
        batch *= 2
    best = 0.0
    for _ in range(ROUNDS):
        calls = 0
        start = time.perf_counter()
        deadline = start + ROUND_S
        while True:
            for _ in range(batch):
                fn()
            calls += batch
            now = time.perf_counter()
            if now >= deadline:
                break
        best = max(best, calls / (now - start))
    return best


def main() -> None:
    device = "bell-seoul-gangnam-0001"
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = key.public_key()
    signer = Signer(device, key)
    msg = build_message(
        Alert(bell="emergency", trigger="long_press", urgent=True, presses=2, linked_to="r" * 32),
        device=device,
        seq=1_234_567,
        ts=1_732_460_000_000,
    )
    payload = dump_message(msg)
    signature = key.sign(payload)
    token = seal(msg, signer)
    topic = parse_topic(up_topic(device, "alert"))
    resolve = {device: public}.__getitem__
    assert open_from_device(token, resolve, topic).message == msg

    sign_per_s = rate(lambda: key.sign(payload))
    verify_per_s = rate(lambda: public.verify(signature, payload))
    seal_per_s = rate(lambda: seal(msg, signer))
    open_per_s = rate(lambda: open_from_device(token, resolve, topic))
    dump_per_s = rate(lambda: dump_message(msg))
    parse_per_s = rate(lambda: parse_message(payload))
    jws_sign_per_s = rate(lambda: signer.sign(payload))
    jws_verify_per_s = rate(lambda: verify(token, resolve))

    ratio = min(seal_per_s / sign_per_s, open_per_s / verify_per_s)
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"payload {len(payload)} bytes, token {len(token)} bytes")
    print(f"ed25519 sign (cryptography)    {sign_per_s:>10,.0f} /s")
    print(f"seal (dump + JWS sign)         {seal_per_s:>10,.0f} /s  {seal_per_s / sign_per_s:.2f}x")
    print(f"ed25519 verify (cryptography)  {verify_per_s:>10,.0f} /s")
    print(
        f"open_from_device               {open_per_s:>10,.0f} /s  {open_per_s / verify_per_s:.2f}x"
    )
    print(f"  of which: dump {dump_per_s:,.0f} /s, parse {parse_per_s:,.0f} /s,")
    print(f"  JWS sign {jws_sign_per_s:,.0f} /s, JWS verify {jws_verify_per_s:,.0f} /s")
    print(f"ratio (goal >= 0.8): {ratio:.2f}")
    print(
        json.dumps(
            {
                "bench": "protocol",
                "figures": {
                    "seal_per_s": round(seal_per_s),
                    "open_per_s": round(open_per_s),
                    "dump_per_s": round(dump_per_s),
                    "parse_per_s": round(parse_per_s),
                    "jws_sign_per_s": round(jws_sign_per_s),
                    "jws_verify_per_s": round(jws_verify_per_s),
                    "payload_bytes": len(payload),
                    "token_bytes": len(token),
                },
                "baseline": {"sign_per_s": round(sign_per_s), "verify_per_s": round(verify_per_s)},
                "ratio": round(ratio, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
