"""The one JSON-over-HTTP client of the command-line tools (enrolment, gateway admin).

Blocking (urllib), for a command that asks and waits. An answer with an error status is
still an answer (`JsonAnswer`): the caller reads its `error` and `reason`. Only a gateway
that cannot be reached, or not trusted, raises `Unreachable`, which says which; the
caller turns it into its own error with the fix for its user.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ansimi.errors import AnsimiError


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    status: int
    body: dict[str, Any]  # not JSON: {"error": its start}; JSON but no object: {}
    headers: Mapping[str, str]


class Unreachable(AnsimiError, ConnectionError):
    """No answer: the network, the address, or a certificate we do not trust."""

    def __init__(self, url: str, reason: str, *, untrusted: bool = False) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason
        self.untrusted = untrusted  # TLS verification failed: the CA is missing or wrong


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
        raise Unreachable(url, str(reason)) from None
    except OSError as exc:  # a timeout too
        raise Unreachable(url, str(exc)) from None
