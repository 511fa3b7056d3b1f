"""Certificate self-renewal: a new certificate for the same key, before the old expires.

The agent looks every `[renew] check_every_s`; within `before_days` of its certificate's
expiry it makes a CSR with its key, signs the request with the same key (the credential,
protocol/renewal.py), and sends it to the gateway's `POST /renew` over HTTPS, trusting the
site CA only (`[mqtt] ca_file`). The new certificate replaces the file atomically (a power
cut leaves the old or the new, both valid); the MQTT session then reads it again and
connects with it. The broker needs nothing: it trusts the CA, not each certificate.

Connecting again cuts the link for a moment, so it waits while that would cut an incident's
messages (an open incident, or an alert or cancel the gateway has not yet received): the
agent looks again every BUSY_LOOK_S. Within RENEW_ANYWAY_MS of the running certificate's
expiry it goes ahead all the same: an expired certificate cuts the bell off for good.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from ansimi.files import write_atomic
from ansimi.jsonhttp import Unreachable, request_json
from device.config import DeviceConfig
from device.enrol import make_csr
from device.errors import DeviceError
from protocol.clock import Clock
from protocol.jws import Signer
from protocol.keys import load_private_key
from protocol.renewal import renew_request

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 30.0
DAY_MS: Final = 86_400_000
# a renewal held back by an incident is looked at again this often
BUSY_LOOK_S: Final = 30.0
# ... and goes ahead anyway this close to the running certificate's expiry
RENEW_ANYWAY_MS: Final = DAY_MS


class RenewalFailed(DeviceError, ConnectionError):
    """The gateway could not be reached, or refused; the message says which and why."""


@dataclass(frozen=True)
class Renewed:
    serial: str
    not_after_ms: int


class Renewal:
    def __init__(self, config: DeviceConfig, signer: Signer, *, now_ms: Clock) -> None:
        self._config = config
        self._signer = signer
        self._now_ms = now_ms

    @property
    def enabled(self) -> bool:
        m = self._config.mqtt
        return bool(self._config.renew.gateway_url) and m.cert_file is not None

    def not_after_ms(self) -> int | None:
        cert_file = self._config.mqtt.cert_file
        if cert_file is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning(
                "device %s: certificate %s unreadable: %s", self._signer.kid, cert_file, exc
            )
            return None
        return int(cert.not_valid_after_utc.timestamp() * 1000)

    def due(self) -> bool:
        not_after = self.not_after_ms()
        before_ms = self._config.renew.before_days * DAY_MS
        return self.enabled and not_after is not None and not_after - self._now_ms() <= before_ms

    def held_by(self, busy: str | None, not_after_ms: int | None = None) -> str | None:
        """Why connecting again must wait: `busy` (what it would cut), unless the running
        certificate (`not_after_ms`; the file's by default) expires within RENEW_ANYWAY_MS."""
        if busy is None:
            return None
        not_after = self.not_after_ms() if not_after_ms is None else not_after_ms
        if not_after is not None and not_after - self._now_ms() <= RENEW_ANYWAY_MS:
            return None
        return busy

    def renew(self) -> Renewed:
        """Blocking (files, HTTPS): run it off the event loop."""
        config = self._config
        key = load_private_key(config.device.key_file)
        csr_pem = make_csr(key, self._signer.kid)
        request = renew_request(self._signer, csr_pem, self._now_ms())
        url = config.renew.gateway_url.rstrip("/") + "/renew"
        ca_file = config.mqtt.ca_file
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        try:
            answer = request_json(
                "POST", url, request.model_dump(), context=context, timeout_s=TIMEOUT_S
            )
        except Unreachable as exc:
            raise RenewalFailed(f"cannot reach {url}: {exc.reason}") from None
        if answer.status != 200:
            message = answer.body.get("error") or f"HTTP {answer.status}"
            raise RenewalFailed(f"the gateway refused the renewal: {message}")
        try:
            cert_pem = str(answer.body["cert_pem"]).encode()
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (KeyError, ValueError) as exc:
            raise RenewalFailed(f"the gateway's answer holds no certificate ({exc})") from None
        if cert.public_key() != key.public_key():
            raise RenewalFailed("the gateway's certificate is for another key: kept the old one")
        assert config.mqtt.cert_file is not None  # enabled
        write_atomic(config.mqtt.cert_file, cert_pem, mode=0o644)
        not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
        expires = dt.datetime.fromtimestamp(not_after / 1000, dt.UTC).date()
        log.warning(
            "device %s: certificate renewed, serial %X, until %s",
            self._signer.kid,
            cert.serial_number,
            expires,
        )
        return Renewed(f"{cert.serial_number:X}", not_after)
