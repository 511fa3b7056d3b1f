"""A device's personal data (address, floor, phone numbers, notes), sealed in the store.

Admins set it (`POST /admin/devices/{id}/private`) and cannot read it back: installing a
bell needs no read, and every reader is one more leak. Operators read it
(`GET /devices/{id}/private`) only for devices of their token's districts; ["*"] is the
central centre. Every read is logged by who and which device, never with the data.

The store sees sealed text only (`ansimi/privacy.py`): one AES-GCM value per device, its
associated data naming the table, the field and the device, so a value copied onto
another device's row does not open.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from ansimi.privacy import Keyring, PrivacyError, key_source, load_keyring
from gateway.api import TOKEN_KEY, ApiRoute, _error, _op, _path_param
from gateway.config import PrivacyConfig
from gateway.errors import GatewayError
from gateway.store import PrivacyStore
from protocol.clock import wall_ms

log = logging.getLogger(__name__)

T = TypeVar("T")
TABLE = "device_private"
COLUMN = "record"


class Phone(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Literal["victim", "guardian", "other"] = "guardian"
    name: Annotated[str, StringConstraints(max_length=100)] = ""
    number: Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{3,16}$")]


class Location(BaseModel):
    """Where the door is (WGS 84 degrees), for the responders' map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]


class PrivateData(BaseModel):
    """What an installer records about the home a bell protects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: Annotated[str, StringConstraints(max_length=300)] = ""
    floor: Annotated[str, StringConstraints(max_length=20)] = ""
    # where the bell is, for the desk's map; sealed with the address
    location: Location | None = None
    phones: Annotated[list[Phone], Field(max_length=10)] = []
    notes: Annotated[str, StringConstraints(max_length=2000)] = ""

    def address_only(self) -> dict[str, str]:
        return {"address": self.address, "floor": self.floor}


class NoDataKey(GatewayError, RuntimeError):
    """Personal data is asked for while the gateway has no data key."""


class Vault:
    """Seal and open devices' personal data on top of the store."""

    def __init__(self, store: PrivacyStore, keyring: Keyring | None, problem: str = "") -> None:
        self._store = store
        self._keyring = keyring
        # why there is no keyring, for the 503 and the log: names the key file and the fix
        self.problem = problem or "no data key configured"

    @property
    def available(self) -> bool:
        return self._keyring is not None

    @property
    def keyring(self) -> Keyring | None:
        """The site's data keys, for other personal data (recordings); None when off."""
        return self._keyring

    def _ring(self) -> Keyring:
        if self._keyring is None:
            raise NoDataKey(self.problem)
        return self._keyring

    async def put(self, device_id: str, data: PrivateData, now_ms: int) -> bool:
        sealed = self._ring().seal(
            data.model_dump_json(), table=TABLE, column=COLUMN, row=device_id
        )
        return await self._store.set_private(device_id, sealed, now_ms)

    async def get(self, device_id: str) -> PrivateData | None:
        sealed = await self._store.private(device_id)
        if sealed is None:
            return None
        plain = self._ring().open(sealed, table=TABLE, column=COLUMN, row=device_id)
        return PrivateData.model_validate_json(plain)

    async def reseal(self, keyring: Keyring) -> int:
        """Re-seal every device's data with `keyring`'s current key (for rotation)."""

        def again(device_id: str, sealed: str) -> str:
            place = {"table": TABLE, "column": COLUMN, "row": device_id}
            return keyring.seal(keyring.open(sealed, **place), **place)

        count = await self._store.reseal_private(again)
        self._keyring = keyring
        return count

    async def address_of(self, device_id: str) -> dict[str, str] | None:
        """For forwarding to centres with `send_address`; None when there is none."""
        if self._keyring is None:
            return None
        try:
            data = await self.get(device_id)
        except (PrivacyError, ValueError) as exc:
            # the alert must go out all the same: an address that cannot be opened costs
            # the address, never the delivery (the error names the row, not the data)
            log.error("privacy: forwarding %s without its address: %s", device_id, exc)
            return None
        return None if data is None or not data.address else data.address_only()


INIT = "ansimi gateway privacy-key init --config /etc/ansimi/gateway.toml"


def open_vault(store: PrivacyStore, config: PrivacyConfig) -> Vault:
    """The vault with the site's data key; without a key file, a vault that refuses.

    A missing key is not fatal (a gateway may hold no personal data), but it is said at
    start-up. A key file others can read, or a damaged one, stops start-up (KeyFileError).
    """
    path, from_credential = key_source(config.key_file, config.credential)
    if not from_credential and not path.exists():
        problem = f"no data key at {path}: personal data is off. Fix: run `{INIT}`"
        log.warning("privacy: %s", problem)
        return Vault(store, None, problem)
    keyring = load_keyring(config.key_file, credential=config.credential, init_hint=INIT)
    log.info("privacy: data key %s loaded from %s", keyring.current.kid, path)
    return Vault(store, keyring)


class PrivateRoutes:
    def __init__(
        self,
        store: PrivacyStore,
        vault: Vault,
        clock_ms: Callable[[], int] | None = None,
        *,
        on_revoked: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._vault = vault
        # the intake's registry refresh, so a decommissioned device is refused at once
        self._on_revoked = on_revoked
        self._clock_ms = clock_ms or wall_ms

    def routes(self) -> list[ApiRoute]:
        device_id = _path_param("device_id", "the device's id")
        body = {"content": {"application/json": {"schema": PrivateData.model_json_schema()}}}
        return [
            ApiRoute(
                "POST",
                "/admin/devices/{device_id}/private",
                self.set,
                "admin",
                _op(
                    "set a device's personal data (sealed at rest; admins cannot read it back)",
                    [200, 400, 401, 403, 404, 503],
                    parameters=[device_id],
                    requestBody=body,
                ),
            ),
            ApiRoute(
                "POST",
                "/admin/devices/{device_id}/decommission",
                self.decommission,
                "admin",
                _op(
                    "revoke a device and wipe its personal data; its events stay, anonymised",
                    [200, 401, 403, 404],
                    parameters=[device_id],
                ),
            ),
            ApiRoute(
                "GET",
                "/devices/{device_id}/private",
                self.get,
                "operator",
                _op(
                    "a device's personal data, for operators of its district (logged)",
                    [200, 401, 403, 404, 500, 503],
                    parameters=[device_id],
                ),
            ),
        ]

    async def set(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        if not self._vault.available:
            return _error(503, "the gateway has no data key: see its log")
        try:
            data = PrivateData.model_validate_json(await request.read())
        except ValidationError as exc:
            # never echo the input: it is somebody's address or phone number
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(400, f"{where}: {first['msg']}")
        if not await self._vault.put(device_id, data, self._clock_ms()):
            return _error(404, "no such device")
        log.info("api: %s set the personal data of %s", request[TOKEN_KEY].name, device_id)
        return web.json_response({"device_id": device_id, "stored": True})

    async def decommission(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        if not await self._store.decommission(device_id, self._clock_ms()):
            return _error(404, "no such device")
        if self._on_revoked is not None:
            await self._on_revoked(device_id)  # refused from its very next message on
        log.warning("api: %s decommissioned %s", request[TOKEN_KEY].name, device_id)
        return web.json_response({"device_id": device_id, "decommissioned": True})

    async def get(self, request: web.Request) -> web.Response:
        device_id = request.match_info["device_id"]
        token = request[TOKEN_KEY]
        # another district's device never gets here: the API's scope middleware answers 404
        # for it (and counts and logs the refusal), as for an unknown one
        if await self._store.device(device_id) is None:
            return _error(404, "no such device in your districts")
        if not self._vault.available:
            return _error(503, "the gateway has no data key: see its log")
        try:
            data = await self._vault.get(device_id)
        except PrivacyError as exc:
            log.error("api: personal data of %s: %s", device_id, exc)
            return _error(500, "the record cannot be opened with this gateway's key: see its log")
        if data is None:
            return _error(404, "no personal data recorded for this device")
        log.info("api: %s read the personal data of %s", token.name, device_id)
        return web.json_response({"device_id": device_id, **data.model_dump()})
