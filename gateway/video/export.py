"""Evidence for the police: an event's recordings, decrypted, with a check anyone can repeat.

`export_evidence` finds the sealed recordings of the event's device around the event's
time, verifies each seal (signature, every chunk, both digests), writes the plaintext
(the byte-exact MP4 or WebM that was recorded), and beside it:

- `evidence.json`: the event, the operator and reason, and per recording its SHA-256 and
  size, with the original seal (facts and JWS) made when the recording ended;
- `evidence.json.sig`: the raw Ed25519 signature of the exact bytes of `evidence.json` by
  the gateway's key (the key that signed the seals);
- `gateway-public.pem`: that key's public half (compare it with the one the site published);
- `VERIFY.txt`: the commands below, with this export's file names.

An independent check needs only OpenSSL 3 and FFmpeg's ffprobe:

    openssl pkeyutl -verify -pubin -inkey gateway-public.pem -rawin \\
        -in evidence.json -sigfile evidence.json.sig      # "Signature Verified Successfully"
    openssl dgst -sha256 RECORDING.mp4                    # equals "sha256" in evidence.json
    ffprobe -v error -show_entries stream=codec_name,width,height:format=duration RECORDING.mp4

Every export is audited (audit.py) with the operator and the reason before it is handed over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ansimi.privacy import Keyring
from gateway.errors import GatewayError
from gateway.video import audit
from gateway.video.encrypted import SUFFIX as ENCRYPTED
from gateway.video.encrypted import decrypt_to
from gateway.video.evidence import SealBroken, seal_path, sha256_of, verify_seal
from protocol.jws import KeyResolver

log = logging.getLogger(__name__)

# a recording belongs to an event if it overlaps this window around the event's time: the
# pre-alarm buffer is inside the recording that the press started, and an operator may
# start video a while after the alert
BEFORE_S: Final = 60.0
AFTER_S: Final = 1800.0
EVIDENCE: Final = "evidence.json"
SIGNATURE: Final = EVIDENCE + ".sig"
PUBLIC_KEY: Final = "gateway-public.pem"
VERIFY: Final = "VERIFY.txt"


class ExportError(GatewayError, ValueError):
    """An export cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Found:
    path: Path
    facts: dict[str, Any]


def recordings_for(
    root: Path,
    device_id: str,
    at_s: float,
    keyring: Keyring,
    resolve: KeyResolver,
) -> list[Found]:
    """The device's sealed recordings overlapping the event's window, verified, oldest first.

    A recording whose seal does not verify is refused loudly (it may be evidence of
    tampering, and must not be handed over as if sound).
    """
    found = []
    folder = root / device_id
    for path in sorted(folder.glob(f"*{ENCRYPTED}")) if folder.is_dir() else []:
        if not seal_path(path).exists():
            continue  # still recording: sealed when its stream ends
        try:
            facts = verify_seal(path, resolve, keyring)
        except SealBroken as exc:
            raise ExportError(f"{exc}: not exported; keep the files and report it") from None
        ended = float(facts.get("ended") or 0.0)
        started = float(facts.get("started") or ended)
        if started <= at_s + AFTER_S and ended >= at_s - BEFORE_S:
            found.append(Found(path, facts))
    return sorted(found, key=lambda f: float(f.facts.get("started") or 0.0))


def _verify_text(files: list[str]) -> str:
    lines = [
        "Check this export with OpenSSL 3 and ffprobe (FFmpeg); no Ansimi software is needed.",
        "",
        "1. The gateway signed evidence.json (expect: Signature Verified Successfully):",
        f"   openssl pkeyutl -verify -pubin -inkey {PUBLIC_KEY} -rawin "
        f"-in {EVIDENCE} -sigfile {SIGNATURE}",
        "   Compare gateway-public.pem with the key the site published.",
        "",
        '2. Each recording is the one sealed (its SHA-256 is the recording\'s "sha256"):',
        *(f"   openssl dgst -sha256 {name}" for name in files),
        "",
        "3. Each recording is playable video:",
        *(
            "   ffprobe -v error -show_entries "
            f"stream=codec_name,width,height:format=duration {name}"
            for name in files
        ),
        "",
        '"complete": false marks a recording the gateway could not finish (a crash); it',
        "holds the video up to about two seconds before that moment.",
    ]
    return "\n".join(lines) + "\n"


def export_evidence(
    *,
    event: dict[str, Any],
    root: Path,
    out: Path,
    keyring: Keyring,
    key: Ed25519PrivateKey,
    kid: str,
    operator: str,
    reason: str,
    clock: Callable[[], float] = time.time,
) -> Path:
    """Write the export of `event` (id, device, type, ts_ms) into the new folder `out`."""
    if not operator.strip() or not reason.strip():
        raise ExportError("an export needs --operator and --reason: both are audited")
    public = key.public_key()
    found = recordings_for(
        root, event["device"], event["ts_ms"] / 1000, keyring, lambda _kid: public
    )
    if not found:
        raise ExportError(
            f"no sealed recording of {event['device']} around event {event['id']} "
            f"({BEFORE_S:g} s before to {AFTER_S:g} s after it)"
        )
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        raise ExportError(f"{out} exists: name a new folder for the export") from None
    try:
        recordings = []
        for item in found:
            target = out / item.facts["recording"]
            with target.open("wb") as f:
                decrypt_to(item.path, keyring, f)
                f.flush()
                os.fsync(f.fileno())
            digest = sha256_of(target)
            if digest != item.facts["plaintext_sha256"]:
                raise ExportError(f"{target}: decrypted bytes differ from the sealed hash")
            seal = json.loads(seal_path(item.path).read_text())
            recordings.append(
                {
                    "file": target.name,
                    "sha256": digest,
                    "size": target.stat().st_size,
                    "codec": item.facts.get("codec"),
                    "complete": item.facts.get("complete"),
                    "started": item.facts.get("started"),
                    "ended": item.facts.get("ended"),
                    "seal": seal,
                }
            )
        document = {
            "event": event,
            "exported_at": clock(),
            "operator": operator,
            "reason": reason,
            "gateway": kid,
            "recordings": recordings,
        }
        body = (json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
        (out / EVIDENCE).write_bytes(body)
        (out / SIGNATURE).write_bytes(key.sign(body))
        (out / PUBLIC_KEY).write_bytes(
            public.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        )
        (out / VERIFY).write_text(_verify_text([r["file"] for r in recordings]))
        # audited before anyone can take the folder away; an audit failure undoes the export
        audit.append(
            root,
            "export",
            operator=operator,
            reason=reason,
            clock=clock,
            event=event["id"],
            device=event["device"],
            recordings=[f.path.name for f in found],
            out=str(out),
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("video: exported %d recording(s) of event %s", len(found), event["id"])
    return out
