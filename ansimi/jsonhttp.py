"""The one JSON-over-HTTP client of the command-line tools (enrolment, gateway admin).

Blocking (urllib), for a command that asks and waits. An answer with an error status is
still an answer (`JsonAnswer`): the caller reads its `error` and `reason`. Only a gateway
that cannot be reached, or not trusted, raises `Unreachable`, which says which; the
caller turns it into its own error with the fix for its user.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ansimi.errors import AnsimiError

CHECK_THE_URL: Final = "check the network and the URL"
NOTHING_LISTENS: Final = (
    "nothing listens on that port: start the service, or check the port in the URL"
)


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    status: int
    body: dict[str, Any]  # not JSON: {"error": its start}; JSON but no object: {}
    headers: Mapping[str, str]


class Unreachable(AnsimiError, ConnectionError):
    """No answer: the network, the address, or a certificate we do not trust."""

    def __init__(
        self, url: str, reason: str, *, untrusted: bool = False, fix: str = CHECK_THE_URL
    ) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason
        self.untrusted = untrusted  # TLS verification failed: the CA is missing or wrong
        self.fix = fix  # what the person who typed the URL can do, from what went wrong


def fix_for(cause: object) -> str:
    """What to do about a request that got no answer, by what stopped it: the common
    mistakes with a URL (the wrong port, https to a plain HTTP server, a typo in the
    host) each have their own."""
    if isinstance(cause, ConnectionRefusedError):
        return NOTHING_LISTENS
    if isinstance(cause, socket.gaierror):
        return "the host name does not resolve: check its spelling, or give an IP address"
    reason = getattr(cause, "reason", None) or ""
    # a server wanting a client certificate (the MQTT broker) ends TLS 1.3 after the
    # handshake: with an alert, or, as timing has it, by closing the connection
    if "CERTIFICATE_REQUIRED" in reason or isinstance(
        cause, ssl.SSLEOFError | ConnectionResetError
    ):
        return (
            "the server on that port ended the TLS connection, as the MQTT broker does without "
            "a client certificate: it is not the HTTPS API; check the port in the URL"
        )
    if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"):
        return "the server on that port does not speak HTTPS: check the port in the URL"
    if isinstance(cause, TimeoutError):
        return "no answer in time: check the network (and any firewall) and the URL"
    return CHECK_THE_URL


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        # not ours (a proxy's error page, say): its start is the best error there is
        return {"error": data[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {}


def request_json(
    method: str,
    url: str,
    body: Mapping[str, Any] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
    timeout_s: float,
    raw: bytes | None = None,
) -> JsonAnswer:
    """Send `body` as JSON (if any), or `raw` bytes (a file), and read a JSON object back.
    The caller has checked that `url` is http(s)."""
    sent = {"Accept": "application/json", **(headers or {})}
    data = raw
    if raw is not None:
        sent["Content-Type"] = "application/octet-stream"
    elif body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=sent)  # noqa: S310 - http(s), checked by the caller
    https = context if url.startswith("https://") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=https) as answer:  # noqa: S310
            return JsonAnswer(answer.status, _json_object(answer.read()), dict(answer.headers))
    except urllib.error.HTTPError as exc:
        return JsonAnswer(exc.code, _json_object(exc.read()), dict(exc.headers))
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise Unreachable(url, str(reason.verify_message), untrusted=True) from None
        raise Unreachable(url, str(reason), fix=fix_for(reason)) from None
    except OSError as exc:  # a timeout too
        raise Unreachable(url, str(exc), fix=fix_for(exc)) from None
