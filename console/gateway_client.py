"""The console's calls to the gateway's operator API, with the console's own token.

The browser never holds the gateway token: it talks to the console (session cookie,
CSRF header), and the console talks to the gateway (bearer token), recording which
operator asked. The gateway records the console's token name as the stage's actor.
"""

from __future__ import annotations

import logging
import ssl
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from console.errors import ConsoleError

log = logging.getLogger(__name__)

STAGES = ("acknowledged", "dispatched", "closed")
# why an incident was closed (the gateway refuses a close without one)
OUTCOMES = ("real", "false_alarm", "test", "cancelled_by_user", "duress")
# the gateway records "<token name>/<operator>" as the actor of what the console asks
OPERATOR_HEADER = "X-Ansimi-Operator"
# the most open incidents asked of the gateway at once (it answers 500 when not told): a
# list this long may leave some out, so an incident missing from it is not known closed
INCIDENTS_LISTED = 5_000


class GatewayError(ConsoleError):
    """A gateway call that did not succeed; `status` is what to answer the browser."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class WhepAnswer:
    sdp: str
    location: str  # the gateway's resource path: /whep/{device}/{viewer}


class GatewayClient:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ca_file: Path | None = None,
        timeout_s: float = 10.0,
        incidents_limit: int = INCIDENTS_LISTED,
    ) -> None:
        """`ca_file`: the site CA that signed the gateway API's certificate (the API is
        served over HTTPS with the site's own CA); None trusts the system's CAs."""
        self.base_url = base_url.rstrip("/")
        self.incidents_limit = incidents_limit
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ssl: ssl.SSLContext | bool = True
        if ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(ca_file))
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout,
                headers=self._headers,
                connector=aiohttp.TCPConnector(ssl=self._ssl),
            )
        return self._http

    def _url(self, *segments: str) -> URL:
        """The gateway URL of these path segments, each quoted whole: an id holding '/',
        '..' or '%2F' stays one segment and cannot climb to another route. Callers check
        ids against their grammar first (console/web.py); this is the second wall."""
        path = "/".join(quote(segment, safe="") for segment in segments)
        return URL(f"{self.base_url}/{path}", encoded=True)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def devices(self) -> list[dict[str, Any]]:
        """The registry, with public keys (`keys=1`)."""
        async with self._session().get(f"{self.base_url}/devices?keys=1") as response:
            if response.status != 200:
                raise GatewayError(response.status, f"GET /devices: HTTP {response.status}")
            data = await response.json()
        devices = data.get("devices")
        if not isinstance(devices, list):
            raise GatewayError(502, "GET /devices: no devices list in the answer")
        return [d for d in devices if isinstance(d, dict)]

    async def private(self, device_id: str) -> dict[str, Any] | None:
        """A device's personal data from `GET /devices/{id}/private` (the gateway logs the
        read), as `private_view` keeps it; None when the gateway has none for it, or none
        for our districts."""
        url = self._url("devices", device_id, "private")
        try:
            async with self._session().get(url) as response:
                # 404: none recorded, or not our districts; 405: a gateway without the
                # route; 503: a gateway without a data key. The page says "no address".
                if response.status in (404, 405, 503):
                    if response.status != 404:
                        log.warning(
                            "console: the gateway cannot give addresses (HTTP %s)", response.status
                        )
                    return None
                if response.status != 200:
                    raise GatewayError(502, f"the gateway answered HTTP {response.status}")
                data = await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc
        return private_view(data)

    async def _call(
        self,
        method: str,
        path: tuple[str, ...],
        *,
        operator: str = "",
        body: Any = None,
        query: dict[str, str] | None = None,
    ) -> Any:
        """One JSON call of the incident API; GatewayError with what to answer the browser
        (404 unknown or not ours, 409 already at that stage, 400 refused, 502 otherwise)."""
        headers = {OPERATOR_HEADER: operator} if operator else {}
        try:
            async with self._session().request(
                method, self._url(*path).with_query(query), json=body, headers=headers
            ) as response:
                if response.status in (400, 404, 409):
                    text = (await response.text()).strip()[:200]
                    raise GatewayError(response.status, f"the gateway refused it: {text}")
                if response.status == 405:
                    raise GatewayError(404, "the gateway has no incident routes (too old)")
                if response.status != 200:
                    raise GatewayError(502, f"the gateway answered HTTP {response.status}")
                return await response.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc

    async def incidents(self) -> list[dict[str, Any]] | None:
        """The open incidents of our districts (`GET /incidents?state=open`), the most
        urgent first, at most `incidents_limit` (`listed_all` tells whether that was all);
        None from a gateway without incidents, whose events the console groups itself."""
        query = {"state": "open", "limit": str(self.incidents_limit)}
        try:
            found = await self._call("GET", ("incidents",), query=query)
        except GatewayError as exc:
            if exc.status == 404:
                return None
            raise
        if isinstance(found, dict):  # {"incidents": [...]}, docs/incidents.md
            found = found.get("incidents")
        if not isinstance(found, list):
            raise GatewayError(502, "GET /incidents: no list in the answer")
        return [i for i in found if isinstance(i, dict)]

    def listed_all(self, incidents: list[dict[str, Any]]) -> bool:
        """Whether `incidents()` answered every open incident: one missing from it is closed."""
        return len(incidents) < self.incidents_limit

    async def fleet(self) -> list[dict[str, Any]]:
        """Every bell of the console's districts with why it needs a visit (`GET /fleet`)."""
        found = await self._call("GET", ("fleet",))
        devices = found.get("devices") if isinstance(found, dict) else None
        if not isinstance(devices, list):
            raise GatewayError(502, "GET /fleet: no devices list in the answer")
        return [d for d in devices if isinstance(d, dict)]

    async def incident(self, incident_id: str) -> dict[str, Any]:
        """One incident with its history and procedure (checklist)."""
        found = await self._call("GET", ("incidents", incident_id))
        if not isinstance(found, dict):
            raise GatewayError(502, "GET /incidents/{id}: not an object")
        return found

    async def move_incident(
        self, incident_id: str, stage: str, operator: str, outcome: str | None = None
    ) -> dict[str, Any]:
        if stage not in STAGES:
            raise GatewayError(404, f"no stage {stage}")
        body = {"outcome": outcome} if outcome is not None else {}
        result = await self._call(
            "POST", ("incidents", incident_id, stage), operator=operator, body=body
        )
        return result if isinstance(result, dict) else {}

    async def tick(self, incident_id: str, step: str, operator: str) -> dict[str, Any]:
        """Tick one step of the incident's procedure; the incident as it is now."""
        result = await self._call(
            "POST", ("incidents", incident_id, "procedure", step), operator=operator
        )
        return result if isinstance(result, dict) else {}

    async def move(self, event_id: str, stage: str) -> dict[str, Any]:
        if stage not in STAGES:
            raise GatewayError(404, f"no stage {stage}")
        url = self._url("alerts", event_id, stage)
        try:
            async with self._session().post(url) as response:
                if response.status == 404:
                    raise GatewayError(404, "the gateway does not know this alert")
                if response.status != 200:
                    raise GatewayError(502, f"the gateway answered HTTP {response.status}")
                result: dict[str, Any] = await response.json()
                return result
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc

    async def whep_offer(self, device_id: str, offer: str, operator: str = "") -> WhepAnswer:
        """`operator`: who watches, for the gateway's audit if the door's microphone is on."""
        url = self._url("whep", device_id)
        headers = {"Content-Type": "application/sdp", "X-Ansimi-Operator": operator}
        try:
            async with self._session().post(url, data=offer.encode(), headers=headers) as response:
                text = await response.text()
                if response.status != 201:
                    raise GatewayError(
                        response.status if response.status in (404, 503) else 502,
                        text.strip()[:200] or f"HTTP {response.status}",
                    )
                return WhepAnswer(text, response.headers.get("Location", ""))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc

    async def whep_talk(self, location: str, *, on: bool, operator: str, reason: str) -> None:
        """Push-to-talk at the gateway for the viewer at `location`; raises GatewayError."""
        parts = location.split("/")
        if len(parts) != 4 or parts[:2] != ["", "whep"]:
            raise GatewayError(502, "the gateway gave an unusable viewer location")
        body = {"on": on, "operator": operator, "reason": reason}
        try:
            async with self._session().post(self._url(*parts[1:], "talk"), json=body) as response:
                if response.status != 200:
                    text = (await response.text()).strip()[:200]
                    raise GatewayError(
                        response.status if response.status in (400, 404, 409) else 502,
                        text or f"HTTP {response.status}",
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc

    async def recordings(self, event_id: str) -> dict[str, Any]:
        """An alert's recordings and timeline at the gateway (its playback API)."""
        url = self._url("video", "events", event_id, "recordings")
        try:
            async with self._session().get(url) as response:
                if response.status != 200:
                    raise GatewayError(
                        response.status if response.status in (404, 409, 503) else 502,
                        f"recordings: HTTP {response.status}",
                    )
                data: dict[str, Any] = await response.json()
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(502, f"the gateway is unreachable ({type(exc).__name__})") from exc

    def play(
        self, event_id: str, index: int, operator: str, reason: str
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """The gateway's response streaming one recording (audited there); for `async with`.

        No total timeout: a recording plays as long as it lasts; a stalled read still ends.
        """
        url = self._url("video", "events", event_id, "play").with_query(
            index=str(index), operator=operator, reason=reason
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        return self._session().get(url, timeout=timeout)

    async def whep_delete(self, location: str) -> None:
        """`location`: the gateway's own answer to the offer, `/whep/{device}/{viewer}`."""
        parts = location.split("/")
        if len(parts) != 4 or parts[:2] != ["", "whep"]:
            log.warning("console: the gateway gave an unusable viewer location; not closing it")
            return
        try:
            async with self._session().delete(self._url(*parts[1:])):
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("console: closing a viewer at the gateway failed: %s", exc)


def private_view(data: dict[str, Any]) -> dict[str, Any]:
    """What the operator's card shows of a bell's personal data, each field of its kind
    whatever the gateway sent: the address and floor, the phone numbers (victim's first),
    the notes, and the location when both coordinates are numbers on the globe."""
    phones = [
        {
            "role": str(p.get("role") or "other"),
            "name": str(p.get("name") or ""),
            "number": str(p.get("number") or ""),
        }
        for p in data.get("phones") or []
        if isinstance(p, dict) and p.get("number")
    ]
    phones.sort(key=lambda p: p["role"] != "victim")
    location = data.get("location")
    lat, lon = (
        (location.get("lat"), location.get("lon")) if isinstance(location, dict) else (None, None)
    )
    located = (
        isinstance(lat, int | float)
        and isinstance(lon, int | float)
        and not isinstance(lat, bool)
        and not isinstance(lon, bool)
        and -90 <= lat <= 90
        and -180 <= lon <= 180
    )
    return {
        "address": str(data.get("address") or ""),
        "floor": str(data.get("floor") or ""),
        "phones": phones,
        "notes": str(data.get("notes") or ""),
        "lat": float(lat) if located else None,  # type: ignore[arg-type]
        "lon": float(lon) if located else None,  # type: ignore[arg-type]
    }
