"""Enrolment records and refusals: what the store's enrolment role answers with.

Below both the store (which keeps the `enrolments` table, gateway/store.py) and the
enrolment routes (gateway/enrol.py, which turn a refusal into its HTTP status), so a store
of any engine refuses a token with the same errors.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.store import DeviceKind

DEFAULT_TTL_S: Final = 24 * 3600

Refusal = Literal["unknown", "expired", "used", "cancelled", "wrong-device", "revoked"]

# a device that must enrol again under its own id (a new board, a wiped card): a new token
_ANOTHER_ONE: Final = (
    "ask for a new one on the installer's machine: `ansimi provision device rotate "
    "DEVICE_ID --dir SITE` for an enrolled device (then `ansimi device enrol --force` with "
    "its token), `ansimi provision device add` for a device never enrolled"
)

# what an installer (or the device's CLI, which shows it) can do about each refusal
_REFUSALS: Final[dict[str, str]] = {
    "unknown": "this enrolment token is not known here: check it was copied whole, and that "
    "this is the gateway that issued it",
    "expired": f"this enrolment token has expired: {_ANOTHER_ONE}",
    "used": f"this enrolment token was used already (each token enrols once): {_ANOTHER_ONE}",
    "cancelled": f"this enrolment token was cancelled: {_ANOTHER_ONE}",
    "wrong-device": "this enrolment token is for another device id: check the id on the label",
    "revoked": "this device is revoked: it cannot be enrolled again under the same id",
}


class EnrolmentError(GatewayError):
    """Root of this module's refusals; `status` is the HTTP status that carries it."""

    status = 400

    def __init__(self, message: str, reason: str = "bad-request") -> None:
        super().__init__(message)
        self.reason = reason


class TokenRefused(EnrolmentError, PermissionError):
    status = 403

    def __init__(self, reason: Refusal) -> None:
        super().__init__(_REFUSALS[reason], reason)


class DuplicateEnrolment(EnrolmentError, ValueError):
    status = 409

    def __init__(self, device_id: str, why: str, *, registered: bool = False) -> None:
        again = (
            f"; to enrol this device again (a new board, a wiped card): `ansimi provision "
            f"device rotate {device_id}`"
            if registered
            else ""
        )
        super().__init__(f"device {device_id} {why}: choose another --id{again}", "duplicate")


class NotEnrolled(EnrolmentError, LookupError):
    status = 404

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"device {device_id} is not enrolled: `rotate` needs an enrolled device; "
            "use `ansimi provision device add` for a new one",
            "not-enrolled",
        )


class OtherDistrict(EnrolmentError, PermissionError):
    status = 403

    def __init__(self, district: str) -> None:
        super().__init__(f"district {district} is not one of this token's", "district")


class CsrRefused(EnrolmentError, ValueError):
    status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message, "csr")


@dataclass(frozen=True, slots=True)
class Pending:
    """One enrolment record (a token's metadata; never the token)."""

    device_id: str
    kind: DeviceKind
    district: str
    label: str
    rotate: bool
    created_ms: int
    expires_ms: int
    used_ms: int | None
    cancelled_ms: int | None
    serial: str | None

    def state(self, now_ms: int) -> Literal["pending", "used", "cancelled", "expired"]:
        if self.used_ms is not None:
            return "used"
        if self.cancelled_ms is not None:
            return "cancelled"
        return "pending" if now_ms < self.expires_ms else "expired"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def new_token(device_id: str) -> str:
    """`<device id>.<256 random bits>`: the device learns its id from the token (and the QR
    label) alone, so the installer types nothing else on the device."""
    return f"{device_id}.{secrets.token_urlsafe(32)}"


def token_device(token: str) -> str:
    """The device id a token names (its part before the first dot)."""
    return token.partition(".")[0]
