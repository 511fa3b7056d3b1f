"""The gateway's admin API, as the installer's CLI uses it (HTTPS, an admin bearer token).

The token comes from `--admin-token-file`, `ANSIMI_ADMIN_TOKEN_FILE` or `ANSIMI_ADMIN_TOKEN`,
never from a command-line argument, where `ps` and shell history would keep it. Errors
carry the HTTP status and the gateway's own message, and never the token.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import ssl
import urllib.error
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ansimi.jsonhttp import Unreachable, request_json
from siteca.errors import ProvisioningError

TIMEOUT_S: Final = 15.0
UPLOAD_TIMEOUT_S: Final = 300.0
TOKEN_ENV: Final = "ANSIMI_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
TOKEN_FILE_ENV: Final = "ANSIMI_ADMIN_TOKEN_FILE"  # noqa: S105
URL_ENV: Final = "ANSIMI_GATEWAY_URL"


class GatewayUnreachable(ProvisioningError, ConnectionError):
    """The gateway did not answer, or its HTTPS certificate is not trusted."""


class GatewayRefused(ProvisioningError, RuntimeError):
    """The gateway answered with an error: `status` and its message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class AdminTokenMissing(ProvisioningError, LookupError):
    pass


class CaMissing(ProvisioningError, FileNotFoundError):
    """No CA certificate to check the gateway's HTTPS certificate with: a local problem."""


def admin_token(token_file: Path | None) -> str:
    path = token_file or (
        Path(os.environ[TOKEN_FILE_ENV]) if TOKEN_FILE_ENV in os.environ else None
    )
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise AdminTokenMissing(
                f"cannot read the admin token file {path} ({exc.strerror}): it holds the "
                'gateway\'s admin token ([[api.tokens]] with role = "admin")'
            ) from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise AdminTokenMissing(
            f"no admin token: pass --admin-token-file, or set {TOKEN_FILE_ENV} or {TOKEN_ENV} "
            '(the gateway\'s [[api.tokens]] entry with role = "admin")'
        )
    return token


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: Mapping[str, str]

    def clock_skew_s(self, now: dt.datetime) -> float | None:
        text = self.headers.get("Date")
        if not text:
            return None
        try:
            return (now - email.utils.parsedate_to_datetime(text)).total_seconds()
        except (TypeError, ValueError):
            return None


class AdminClient:
    def __init__(
        self, base_url: str, token: str, *, ca_file: Path | None = None, role: str = "admin"
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        # whose token this is, for the message when the gateway does not know it
        self.role = role
        if ca_file is not None and not ca_file.exists():
            raise CaMissing(
                f"no CA certificate at {ca_file}: pass --ca-file with the site's ca/ca.crt"
            )
        try:
            self._context = ssl.create_default_context(
                cafile=str(ca_file) if ca_file is not None else None
            )
        except ssl.SSLError:
            raise CaMissing(
                f"{ca_file} holds no PEM CA certificate: pass the site's ca/ca.crt"
            ) from None
        self.ca_file = ca_file

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        auth: bool = True,
        raw: bytes | None = None,
    ) -> Answer:
        url = self.base_url + path
        if not url.startswith(("https://", "http://")):
            raise GatewayUnreachable(f"gateway URL {self.base_url!r} is not http(s)://")
        headers = {"Authorization": f"Bearer {self._token}"} if auth else {}
        try:
            answer = request_json(
                method,
                url,
                body,
                headers=headers,
                context=self._context,
                # a bundle is megabytes: give it time on a slow link
                timeout_s=TIMEOUT_S if raw is None else UPLOAD_TIMEOUT_S,
                raw=raw,
            )
        except Unreachable as exc:
            if exc.untrusted:
                raise GatewayUnreachable(
                    f"the gateway at {self.base_url} is not trusted ({exc.reason}): pass "
                    "--ca-file with the site's ca/ca.crt"
                ) from None
            raise GatewayUnreachable(
                f"cannot reach the gateway at {self.base_url}: {exc.reason}. Fix: {exc.fix}"
            ) from None
        return Answer(answer.status, answer.body, answer.headers)

    def ok(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        allow: tuple[int, ...] = (),
        raw: bytes | None = None,
    ) -> Answer:
        answer = self.call(method, path, body, raw=raw)
        if answer.status >= 400 and answer.status not in allow:
            message = str(answer.body.get("error") or f"HTTP {answer.status}")
            if answer.status == 401:
                # the gateway says the same for no token and an unknown one: a token was sent
                message = (
                    f"the gateway does not know this {self.role} token: use the token_file of "
                    f'an [[api.tokens]] entry with role = "{self.role}" in its gateway.toml'
                )
                if self.role == "admin":
                    message += " (init-site wrote gateway/tokens/admin.token; --dir SITE reads it)"
            elif answer.status == 403 and not answer.body.get("reason"):
                message += f': use a token with role = "{self.role}"'
            raise GatewayRefused(answer.status, message, str(answer.body.get("reason", "")))
        return answer

    # ---- the routes ---------------------------------------------------------------------

    def health(self) -> Answer:
        return self.call("GET", "/healthz", auth=False)

    def create_enrolment(
        self,
        device_id: str,
        kind: str,
        district: str,
        label: str,
        *,
        ttl_s: int,
        rotate: bool = False,
    ) -> dict[str, Any]:
        body = {
            "device_id": device_id,
            "kind": kind,
            "district": district,
            "label": label,
            "ttl_s": ttl_s,
            "rotate": rotate,
        }
        return self.ok("POST", "/admin/enrolments", body).body

    def enrolments(self, device_id: str | None = None) -> list[dict[str, Any]]:
        query = "?" + urllib.parse.urlencode({"device_id": device_id}) if device_id else ""
        records = self.ok("GET", "/admin/enrolments" + query).body.get("enrolments", [])
        return list(records)

    def cancel_enrolments(self, device_id: str) -> int:
        body = self.ok("DELETE", f"/admin/enrolments/{_segment(device_id)}").body
        return int(body.get("cancelled", 0))

    def register_device(
        self, device_id: str, public_key: str, kind: str, district: str, label: str = ""
    ) -> None:
        """Registers a device whose key was made elsewhere (the demo's, the simulator's)."""
        body = {
            "id": device_id,
            "public_key": public_key,
            "kind": kind,
            "district": district,
            "label": label,
        }
        self.ok("POST", "/admin/devices", body)

    def set_private(self, device_id: str, data: dict[str, Any]) -> None:
        """Sets a device's personal data (sealed by the gateway; admins cannot read it back)."""
        self.ok("POST", f"/admin/devices/{_segment(device_id)}/private", data)

    def device(self, device_id: str) -> dict[str, Any] | None:
        answer = self.ok("GET", f"/admin/devices/{_segment(device_id)}", allow=(404,))
        return None if answer.status == 404 else answer.body

    def revoke_device(self, device_id: str) -> bool:
        """True if the gateway knew the device (now revoked), False if it never enrolled."""
        answer = self.ok("POST", f"/admin/devices/{_segment(device_id)}/revoke", allow=(404,))
        return answer.status != 404

    def test_press(self, device_id: str) -> bool:
        """Ask the bell for a test press now; False if the gateway does not know it."""
        path = f"/admin/devices/{_segment(device_id)}/test-press"
        return self.ok("POST", path, allow=(404,)).status != 404

    def set_config_layer(
        self, district: str | None, device_id: str | None, config: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Replace (None: remove) the site's, a district's or a device's remote config layer."""
        if device_id is not None:
            path = f"/admin/devices/{_segment(device_id)}/config"
        elif district is not None:
            path = f"/admin/config/district/{_segment(district)}"
        else:
            path = "/admin/config/site"
        if config is None:
            return self.ok("DELETE", path).body
        return self.ok("PUT", path, config).body

    def config_layers(self) -> list[dict[str, Any]]:
        return list(self.ok("GET", "/admin/config").body.get("layers", []))

    def config_drift(self) -> list[dict[str, Any]]:
        return list(self.ok("GET", "/admin/config/drift").body.get("devices", []))

    def decommission_device(self, device_id: str) -> bool:
        """Revoke and wipe the device's personal data at the gateway; False if unknown."""
        path = f"/admin/devices/{_segment(device_id)}/decommission"
        return self.ok("POST", path, allow=(404,)).status != 404

    # ---- agent releases and rollouts (gateway/rollout.py) ------------------------------

    def add_release(self, bundle: bytes) -> dict[str, Any]:
        return self.ok("POST", "/admin/releases", raw=bundle).body

    def start_rollout(self, version: str, district: str, percent: float) -> dict[str, Any]:
        body = {"version": version, "district": district, "percent": percent}
        return self.ok("POST", "/admin/rollouts", body).body

    def rollouts(self) -> dict[str, Any]:
        return self.ok("GET", "/admin/rollouts").body

    def resume_rollout(self, percent: float | None) -> dict[str, Any]:
        body = {} if percent is None else {"percent": percent}
        return self.ok("POST", "/admin/rollouts/resume", body).body

    def abort_rollout(self) -> dict[str, Any]:
        return self.ok("POST", "/admin/rollouts/abort").body


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")
