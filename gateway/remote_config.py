"""Remote configuration at the gateway: desired layers, the signed `set_config`, and drift.

What a device should run is the site's layer, then its district's, then its own, merged key
by key (protocol/remote_config.py). A layer set through the API goes to the store and, as a
signed `set_config` carrying each affected device's whole merged patch, to those devices.
Each heartbeat says which config hash its device runs; a hash that changes is written to the
store (not every heartbeat: 10,000 bells beat every few seconds). A device whose reported
hash is not the desired one is *drifting*: it missed the command (offline), refused it, or
rolled it back (both also come as `health` events). The gateway sends it again, at most once
per `[remote_config] resend_after_s` per device, so a config that breaks a device's link is
not pushed at it in a loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import ValidationError

from ansimi.districts import UnknownDistrict, check_district
from gateway.api import TOKEN_KEY, ApiRoute, _error, _op, _path_param
from gateway.downlink import Downlink
from gateway.errors import GatewayError
from gateway.intake import KeptHeartbeat
from gateway.metrics import Metrics
from gateway.store import ConfigScope, ConfigStore, Device
from protocol.keys import public_key_from_b64
from protocol.messages import Command
from protocol.remote_config import (
    CONFIG_PATCH,
    config_hash,
    merge_layers,
    refused_key,
    without_sealed_numbers,
)
from protocol.sealed_numbers import BadNumbers, seal_numbers

log = logging.getLogger(__name__)

DriftState = Literal["in_sync", "drift", "unknown"]
Patch = dict[str, dict[str, Any]]


class BadConfig(GatewayError, ValueError):
    """A layer the API refuses; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Drift:
    device_id: str
    district: str
    desired_hash: str
    reported_hash: str | None
    reported_ms: int | None
    # its layer's SMS numbers were sealed to a key it no longer has (rotated): not sent
    numbers_needed: bool = False

    @property
    def state(self) -> DriftState:
        if self.reported_hash is None:
            return "unknown"  # never heard a hash from it (an agent from before, or silent)
        return "in_sync" if self.reported_hash == self.desired_hash else "drift"

    def as_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "district": self.district,
            "desired_hash": self.desired_hash,
            "reported_hash": self.reported_hash,
            "reported_ms": self.reported_ms,
            "state": self.state,
            "numbers_needed": self.numbers_needed,
        }


def checked_patch(raw: object) -> Patch:
    """A layer as the API takes it: a bounded patch of keys devices may be sent."""
    try:
        patch = CONFIG_PATCH.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadConfig(f"{where}: {first['msg']}") from None
    why_not = refused_key(patch)
    if why_not is not None:
        raise BadConfig(why_not)
    return patch


def seal_sms_numbers(
    raw: object, device: Device | None, sealed_now: str | None = None
) -> tuple[object, str | None]:
    """A layer with `[sms] numbers` in clear sealed to `device`'s key (`numbers_from_gateway`,
    protocol/sealed_numbers.py), and the public key they are sealed to: the gateway sees the
    numbers in the request only, and keeps and sends them sealed. Only a device's own layer
    may carry numbers (`device` None: a site or district layer), since one sealed value opens
    on one device only. A sealed value given back (as GET /admin/config shows it) is kept
    only if it is `sealed_now`, the one the device's layer holds for its present key: the
    gateway cannot tell which key another one was sealed to."""
    if not isinstance(raw, dict) or not isinstance(raw.get("sms"), dict):
        return raw, None
    sms = dict(raw["sms"])
    given = [key for key in ("numbers", "numbers_from_gateway") if key in sms]
    if given and device is None:
        raise BadConfig(f"[sms] {given[0]}: only in a device's own layer (sealed to its key)")
    if device is None or not given:
        return raw, None
    if "numbers" not in sms:
        if sms["numbers_from_gateway"] != sealed_now:
            raise BadConfig(
                "[sms] numbers_from_gateway: not the value sealed for this device's present "
                "key: give [sms] numbers in clear"
            )
        return raw, device.public_key
    numbers = sms.pop("numbers")
    if not isinstance(numbers, list):
        raise BadConfig("[sms] numbers: a list of phone numbers in international form")
    try:
        sms["numbers_from_gateway"] = seal_numbers(numbers, public_key_from_b64(device.public_key))
    except BadNumbers as exc:
        raise BadConfig(f"[sms] numbers: {exc}") from None
    return {**raw, "sms": sms}, device.public_key


class RemoteConfigs:
    def __init__(
        self,
        store: ConfigStore,
        downlink: Downlink,
        metrics: Metrics,
        *,
        devices: Callable[[], Iterable[Device]],
        resend_after_ms: int,
        clock_ms: Callable[[], int],
    ) -> None:
        self._store = store
        self._downlink = downlink
        self._metrics = metrics
        self._devices = devices  # known and not revoked
        self._resend_after_ms = resend_after_ms
        self._clock_ms = clock_ms
        self._layers: dict[tuple[str, str], Patch] = {}
        # device id -> the public key its layer's SMS numbers were sealed to
        self._sealed_to: dict[str, str | None] = {}
        self.reported: dict[str, tuple[str, int]] = {}
        self._sent_ms: dict[str, int] = {}  # when each device was last sent its config
        self._changed: dict[str, tuple[str, int]] = {}  # reported, not yet in the store
        self._check: set[str] = set()  # reported something else than desired, last we knew
        # device -> (its public key, its desired hash), until load(): a rotated key may
        # change what it should run (numbers_needed)
        self._desired_hash: dict[str, tuple[str, str]] = {}
        self._wake = asyncio.Event()
        self.sent = 0

    async def load(self) -> None:
        self._desired_hash.clear()
        layers = await self._store.config_layers()
        self._layers = {(layer.scope, layer.name): json.loads(layer.patch_json) for layer in layers}
        self._sealed_to = {
            layer.name: layer.sealed_to_key for layer in layers if layer.scope == "device"
        }
        self.reported = {**await self._store.reported_configs(), **self._changed}

    # ---- what each device should run -----------------------------------------------------

    def desired(self, device: Device) -> Patch:
        merged = merge_layers(
            self._layers.get(key, {})
            for key in (("site", ""), ("district", device.district), ("device", device.device_id))
        )
        # checked against the registry's key each time, not when a rotation completes: every
        # instance sees the new key within its registry's reload, none sends a stale value
        return without_sealed_numbers(merged) if self.numbers_needed(device) else merged

    def numbers_needed(self, device: Device) -> bool:
        """Its layer holds SMS numbers sealed to another key than the one it has now (its key
        was rotated since): it cannot open them and the gateway cannot seal them again (it
        never kept them), so an admin must give them again."""
        return (
            self._sealed_value(device) is not None
            and self._sealed_to.get(device.device_id) != device.public_key
        )

    def sealed_numbers(self, device: Device) -> str | None:
        """The sealed value its layer holds for its present key, if any."""
        return None if self.numbers_needed(device) else self._sealed_value(device)

    def _sealed_value(self, device: Device) -> str | None:
        sms = self._layers.get(("device", device.device_id), {}).get("sms", {})
        value = sms.get("numbers_from_gateway")
        return value if isinstance(value, str) else None

    def layers(self) -> list[tuple[str, str, Patch]]:
        return [(scope, name, patch) for (scope, name), patch in sorted(self._layers.items())]

    def drift(self) -> list[Drift]:
        rows = []
        for device in sorted(self._devices(), key=lambda d: d.device_id):
            reported = self.reported.get(device.device_id)
            rows.append(
                Drift(
                    device.device_id,
                    device.district,
                    config_hash(self.desired(device)),
                    None if reported is None else reported[0],
                    None if reported is None else reported[1],
                    self.numbers_needed(device),
                )
            )
        return rows

    async def set_layer(
        self,
        scope: ConfigScope,
        name: str,
        patch: Patch | None,
        sealed_to_key: str | None = None,
    ) -> int:
        """Keep a layer (None removes it) and send the devices it touches their config;
        the number of devices sent one. `sealed_to_key`: the public key a device layer's SMS
        numbers were sealed to (`seal_sms_numbers`)."""
        if scope == "site":
            name = ""
        now = self._clock_ms()
        await self._store.set_config_layer(
            scope,
            name,
            None if patch is None else json.dumps(patch, sort_keys=True),
            now,
            sealed_to_key,
        )
        await self.load()
        touched = [
            d
            for d in self._devices()
            if scope == "site"
            or (scope == "district" and d.district == name)
            or (scope == "device" and d.device_id == name)
        ]
        for device in touched:
            self._send(device, now)
        return len(touched)

    def _send(self, device: Device, now: int) -> None:
        self._sent_ms[device.device_id] = now
        self.sent += 1
        self._downlink.send(
            device.device_id, Command(name="set_config", config=self.desired(device))
        )

    # ---- what devices report ---------------------------------------------------------------

    def heartbeats(self, beats: Iterable[KeptHeartbeat]) -> None:
        """Heartbeats just kept: one with a new hash is news to keep, and one that is not
        the desired config is looked at by `flush` (run's task)."""
        for beat in beats:
            reported = beat.body.config_hash
            if reported is None:
                continue  # an agent from before remote config: nothing to judge
            device_id = beat.device_id
            known = self.reported.get(device_id)
            if known is None or known[0] != reported:
                # when it came, not when a held heartbeat was flushed (up to 10 s later)
                at_ms = self._clock_ms() if beat.arrived_ms is None else beat.arrived_ms
                self.reported[device_id] = self._changed[device_id] = (reported, at_ms)
                self._wake.set()
            desired = self._desired_hash.get(device_id)
            if desired is None or desired[1] != reported:
                self._check.add(device_id)
                self._wake.set()

    async def flush(self) -> None:
        """Write the hashes that changed; send devices that drift their config again, each
        at most once per `resend_after_ms` (one offline when it was sent gets it on its
        return; one that rolled it back ignores it: device/remote_config.py)."""
        changed, self._changed = self._changed, {}
        check, self._check = self._check, set()
        for device_id, (reported, at_ms) in changed.items():
            await self._store.report_config(device_id, reported, at_ms)
        if not check:
            return
        now = self._clock_ms()
        by_id = {d.device_id: d for d in self._devices()}
        for device_id in check:
            device = by_id.get(device_id)
            if device is None:
                continue  # revoked or gone since
            cached = self._desired_hash.get(device_id)
            if cached is None or cached[0] != device.public_key:
                cached = device.public_key, config_hash(self.desired(device))
                self._desired_hash[device_id] = cached
                if self.numbers_needed(device):
                    log.warning(
                        "device %s: its SMS numbers were sealed to a key it no longer has "
                        "(rotated): left out of its config until set again with `ansimi "
                        "provision config set --device %s`",
                        device_id,
                        device_id,
                    )
            desired = cached[1]
            reported = self.reported[device_id][0]
            last = self._sent_ms.get(device_id)
            if reported != desired and (last is None or now - last >= self._resend_after_ms):
                log.warning(
                    "device %s: runs config %s, not the one desired: sent again",
                    device_id,
                    reported[:12],
                )
                self._send(device, now)

    async def run(self) -> None:
        await self.load()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                # the store may be down for a while: the hashes are news again next beat
                log.exception("remote config: keeping reported hashes failed")

    # ---- API -------------------------------------------------------------------------------

    def routes(self) -> list[ApiRoute]:
        layers = [
            ("/admin/config/site", "the site's layer", []),
            (
                "/admin/config/district/{district}",
                "a district's layer",
                [_path_param("district", "the district's code")],
            ),
            (
                "/admin/devices/{device_id}/config",
                "a device's own layer",
                [_path_param("device_id", "the device's id")],
            ),
        ]
        routes = [
            ApiRoute(
                "GET",
                "/config/drift",
                self.drift_listing,
                "operator",
                _op(
                    "each device's desired and reported config hash, and whether its SMS"
                    " numbers must be set again after a key rotation (own districts)",
                    [200, 401, 403],
                ),
            ),
            ApiRoute(
                "GET",
                "/admin/config/drift",
                self.drift_listing,
                "admin",
                _op("the same for the installer's CLI (own districts)", [200, 401, 403]),
            ),
            ApiRoute(
                "GET",
                "/admin/config",
                self.layer_listing,
                "admin",
                _op("the remote config layers: site, districts, devices", [200, 401, 403]),
            ),
        ]
        for path, what, parameters in layers:
            routes.append(
                ApiRoute(
                    "PUT",
                    path,
                    self.put_layer,
                    "admin",
                    _op(
                        f"replace {what} (a JSON patch of sections and keys) and send the"
                        " devices it touches their merged config",
                        [200, 400, 401, 403, 404],
                        parameters=parameters,
                    ),
                )
            )
            routes.append(
                ApiRoute(
                    "DELETE",
                    path,
                    self.delete_layer,
                    "admin",
                    _op(
                        f"remove {what} and send the devices it touched their config",
                        [200, 401, 403, 404],
                        parameters=parameters,
                    ),
                )
            )
        return routes

    async def drift_listing(self, request: web.Request) -> web.Response:
        rows = self.drift()
        districts = request[TOKEN_KEY].districts
        if "*" not in districts:
            rows = [r for r in rows if r.district in districts]
        return web.json_response({"devices": [r.as_json() for r in rows]})

    async def layer_listing(self, request: web.Request) -> web.Response:
        # a token sees the site's layer and its own districts' and devices' layers only: a
        # device layer names a device id of its district
        token = request[TOKEN_KEY]
        district_of = {d.device_id: d.district for d in self._devices()}
        stale = {d.device_id for d in self._devices() if self.numbers_needed(d)}
        layers = []
        for scope, name, patch in self.layers():
            if scope != "site" and not token.sees(
                name if scope == "district" else district_of.get(name, "")
            ):
                continue
            row: dict[str, Any] = {"scope": scope, "name": name}
            if scope == "device" and name in stale:
                # a value sealed to a key the device no longer has is not shown (nor given
                # back by a copy of this listing)
                patch = without_sealed_numbers(patch)
                row["numbers_needed"] = True
            layers.append({**row, "config": patch, "hash": config_hash(patch)})
        return web.json_response({"layers": layers})

    def _target(self, request: web.Request) -> tuple[ConfigScope, str] | web.Response:
        """The layer a request names, if the token's districts cover it (a device's are
        checked by the API's district middleware, as on every device route)."""
        token = request[TOKEN_KEY]
        if "device_id" in request.match_info:
            device_id = request.match_info["device_id"]
            if not any(d.device_id == device_id for d in self._devices()):
                return _error(404, "no such device (or revoked)")
            return "device", device_id
        if "district" not in request.match_info:
            if "*" not in token.districts:
                return _error(403, "the site's layer needs a token for every district")
            return "site", ""
        try:
            district = check_district(request.match_info["district"])
        except UnknownDistrict as exc:
            return self._refuse(request, str(exc))
        if not token.sees(district):
            return _error(404, "not found in your districts")
        return "district", district

    def _refuse(self, request: web.Request, why: str) -> web.Response:
        self._metrics.api_refused.labels("bad_config").inc()
        log.info("api: refused %s %s: %s", request.method, request.path, why)
        return _error(400, why)

    async def put_layer(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        scope, name = target
        device = next((d for d in self._devices() if d.device_id == name), None)
        if scope != "device":
            device = None
        sealed_now = None if device is None else self.sealed_numbers(device)
        try:
            raw, sealed_to_key = seal_sms_numbers(await request.json(), device, sealed_now)
            patch = checked_patch(raw)
        except (BadConfig, ValueError) as exc:
            return self._refuse(request, str(exc))
        sent = await self.set_layer(*target, patch, sealed_to_key)
        log.warning(
            "api: %s set the %s config layer %r (%d devices sent it)",
            request[TOKEN_KEY].name,
            target[0],
            target[1],
            sent,
        )
        return web.json_response({"hash": config_hash(patch), "devices_sent": sent})

    async def delete_layer(self, request: web.Request) -> web.Response:
        target = self._target(request)
        if isinstance(target, web.Response):
            return target
        if (target[0], target[1]) not in self._layers:
            return _error(404, "no such layer")
        sent = await self.set_layer(*target, None)
        log.warning("api: %s removed the %s config layer %r", request[TOKEN_KEY].name, *target)
        return web.json_response({"devices_sent": sent})
