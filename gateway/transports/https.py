"""An HTTPS control centre: a POST of JSON carrying the device's original JWS, an
`Idempotency-Key` (the event id, so a centre can drop our retries) and an HMAC-SHA256 of the
body with the centre's secret."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Awaitable, Callable

import aiohttp

from gateway.config import Centre, ForwardConfig
from gateway.incidents import about_a_district
from gateway.store import Delivery
from gateway.transports.base import DELIVERED, Outcome
from protocol.forwarding import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    delivery_signature,
    signed_body,
)
from protocol.numbers import Malformed, parse_whole

Clock = Callable[[], int]

# 4xx answers that mean "not now" rather than "never like this"
TRANSIENT_4XX = frozenset({408, 429})
# characters of a centre's refusal kept as the reason
REASON_MAX = 200


def delivery_body(
    delivery: Delivery, district: str, address: dict[str, str] | None = None
) -> bytes:
    data: dict[str, object] = {
        "event_id": delivery.event_id,
        "device_id": delivery.device_id,
        "district": district,
        "type": delivery.type,
        "ts_ms": delivery.ts_ms,
        # as the device signed it: our model would fill in defaults it left out
        "body": signed_body(delivery.jws),
        "jws": delivery.jws,
    }
    if delivery.clock_skew_ms is not None:
        # the device's clock was this far off ours: metadata beside the signed payload,
        # which stays exactly what the device signed (protocol.replay, rule 2)
        data["clock_skew_ms"] = delivery.clock_skew_ms
    if delivery.incident is not None:
        # the incident it belongs to, as now (docs/incidents.md): beside the signed payload
        data["incident_id"], data["kind"], data["priority"] = delivery.incident
    if address is not None:
        # personal data: only for centres configured with send_address (gateway/private.py)
        data["address"] = address
    return json.dumps(data, separators=(",", ":")).encode()


AddressOf = Callable[[str], Awaitable[dict[str, str] | None]]


class HttpsCentre:
    """POSTs to one centre's endpoint over its own connection pool and TLS settings."""

    def __init__(
        self,
        centre: Centre,
        config: ForwardConfig,
        clock_ms: Clock,
        address_of: AddressOf | None = None,
    ) -> None:
        self.centre = centre
        # asked only when the centre has send_address: the others never get the address
        self._address_of = address_of if centre.send_address else None
        self.concurrency = config.concurrency
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._clock_ms = clock_ms
        self._ssl: ssl.SSLContext | bool = True  # True: aiohttp's default, the system CAs
        if centre.ca_file is not None:
            # a private CA for this centre only; hostname checking stays on
            self._ssl = ssl.create_default_context(cafile=str(centre.ca_file))
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self.concurrency, ssl=self._ssl),
            )
        return self._http

    async def send(self, delivery: Delivery, district: str) -> Outcome:
        address = None
        kind = None if delivery.incident is None else delivery.incident[1]
        # a district's outage is told about its first bell: not that bell's address
        if self._address_of is not None and not about_a_district(
            delivery.type, delivery.body_json, kind
        ):
            address = await self._address_of(delivery.device_id)
        body = delivery_body(delivery, district, address)
        timestamp = str(self._clock_ms())
        headers = {
            "Content-Type": "application/json",
            IDEMPOTENCY_HEADER: delivery.event_id,
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: delivery_signature(self.centre.secret, timestamp, body),
        }
        try:
            async with self._session().post(
                str(self.centre.url), data=body, headers=headers
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return DELIVERED
                retry_after = _retry_after_ms(response.headers.get("Retry-After"))
                permanent = 400 <= status < 500 and status not in TRANSIENT_4XX
                reason = await _reason(response) if permanent else ""
                return Outcome(f"HTTP {status}{reason}", permanent, retry_after)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            return Outcome(type(exc).__name__ + (f": {exc}" if str(exc) else ""))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


async def _reason(response: aiohttp.ClientResponse) -> str:
    """The centre's own words for a refusal (our console answers {"error": ...}), short and
    printable, for the log and the deliveries listing."""
    try:
        text = (await response.content.read(REASON_MAX)).decode("utf-8", "replace")
    except (aiohttp.ClientError, TimeoutError):
        return ""
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    text = "".join(c if c.isprintable() else " " for c in text).strip()[:REASON_MAX]
    return f": {text}" if text else ""


def _retry_after_ms(value: str | None) -> int:
    # only the seconds form: an HTTP date from a centre's clock is not worth trusting;
    # anything else (a date, '²', '-1') is ignored, the backoff applies
    if value is None:
        return 0
    try:
        return min(parse_whole(value.strip(), "Retry-After"), 3600) * 1000
    except Malformed:
        return 0
