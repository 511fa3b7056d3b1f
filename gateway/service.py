"""The gateway as one service: MQTT session, intake, forwarding, as named tasks.

Its health (gateway/health.py): the intake proves itself with probes the gateway sends
itself; a deaf intake answers /healthz with 503, and stops the watchdog pings only where a
restart may help (connected, yet deaf past resubscribe and reconnect); a centre down or the
disk low is degraded (200, reported). The rule for each path is written there.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ansimi import sdnotify
from ansimi.config import broker_addresses
from ansimi.mqtt import Message, Session, Settings, TlsFiles
from gateway.api import Api, tls_context
from gateway.certwatch import CertWatch, site_certificates
from gateway.config import Centre, GatewayConfig, SiaReceiver
from gateway.deliveries import DeliveryRoutes
from gateway.downlink import Downlink
from gateway.enrol import attach_if_site
from gateway.fleethealth import FleetHealth
from gateway.fleetview import FleetView, VisitRules
from gateway.forward import Forwarder
from gateway.health import DiskState, DiskWatch, Health, IntakeProbe
from gateway.incident_api import IncidentRoutes
from gateway.incidents import Escalator, Incident
from gateway.intake import Intake, KeptHeartbeat, Registry
from gateway.metrics import Metrics
from gateway.private import PrivateRoutes, Vault, open_vault
from gateway.remote_config import RemoteConfigs
from gateway.rollout import Releases, Rollouts
from gateway.secondary import SecondaryPathWatch
from gateway.store import Delivery, Device, Incoming, Store, open_store
from gateway.supervise import Supervisor
from gateway.testwatch import TestWatch
from gateway.transports import build_transports
from gateway.uplink import AmqpUplink, MqttUplink, Uplink
from protocol.clock import wall_ms
from protocol.jws import Signer
from protocol.keys import load_private_key, public_key_from_b64
from protocol.messages import Status
from protocol.topics import UP_FILTER, shared_up_filter

if TYPE_CHECKING:
    from gateway.video.hub import VideoHub

log = logging.getLogger(__name__)


# Full (generation 2) collections at most one in this many generation 1 ones; Python's
# default is 10 (docs/performance.md, "The garbage collector")
FULL_COLLECTION_EVERY = 100


def settle_gc() -> None:
    """The cyclic garbage collector set for a gateway that has started (`Gateway.ready`).

    Each heartbeat leaves objects that live until the device's next one (its fleet-health
    row, its parsed body), so the oldest generation keeps filling, and full collections,
    each a pass over every object of the process, came round every ~8,000 heartbeats at
    20,000 devices (bench/intake.py): ~10 us a heartbeat, in pauses of ~80 ms. Frozen,
    what the start loaded (modules, the registry, the supervisor's table) is never passed
    over again: a full collection takes half as long; and they come ten times more rarely.
    Garbage in reference cycles is freed later, not kept: by then only cycles among the
    frozen objects, which live as long as the process anyway, are never freed.
    """
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def mqtt_settings(config: GatewayConfig) -> Settings:
    m = config.mqtt
    tls = None
    if m.ca_file is not None:
        tls = TlsFiles(m.ca_file, m.cert_file, m.key_file)
    return Settings(
        host=m.host,
        port=m.port,
        client_id=m.client_id or config.id,
        session_expiry_s=m.session_expiry_s,
        version=m.version,
        tls=tls,
        other_addresses=m.other_addresses(),
    )


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        signer: Signer | None = None,
        store: Store | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.store: Store = store or open_store(
            config.store_url,
            config.incidents.priority_of_kind(),
            password_file=config.store_password_file,
        )
        self.metrics = Metrics()
        self.registry = Registry(self.store)
        if signer is None:
            key = load_private_key(
                config.signing_key, hint="run `ansimi provision init-site`, or set signing_key"
            )
            signer = Signer(config.id, key)
        self.signer = signer
        self.session = Session(
            mqtt_settings(config),
            self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self.uplink = make_uplink(config, self.session, self._on_message)
        self.downlink = Downlink(
            signer,
            lambda topic, payload: self.session.publish(topic, payload),
            batched_writes=self.session.batched_writes,
        )
        # personal data: sealed with the site's data key; without one the routes say 503
        self.vault: Vault = open_vault(self.store, config.privacy)
        clock_ms = wall_ms
        centres: list[Centre | SiaReceiver] = [*config.centres, *config.sia]
        self.forwarder = Forwarder(
            self.store,
            centres,
            config.forward,
            self.metrics,
            district_of=self._district_of,
            on_first_delivery=self._on_first_delivery,
            # centres allowed the address get it from the vault; the others never ask
            transports=build_transports(centres, config.forward, clock_ms, self.vault.address_of),
        )
        self.supervisor = Supervisor(
            self.store,
            self.downlink,
            self.metrics,
            route_of=self._route_of,
            timeout_ms=config.supervise.timeout_ms,
            will_grace_ms=config.supervise.will_grace_ms,
            outages=config.supervise.outage_rule(),
            tick_s=config.supervise.tick_s,
            on_event=self.forwarder.wake,
            per_account=[s.name for s in config.sia],
        )
        self.secondary = SecondaryPathWatch(
            self.store,
            self.downlink,
            self.metrics,
            route_of=self._route_of,
            on_event=self.forwarder.wake,
        )
        self.fleet = FleetHealth(
            self.metrics,
            district_of=self._district_of,
            drift_flag_ms=int(config.fleet.clock_drift_flag_s * 1000),
            clock_ms=clock_ms,
        )
        self.configs = RemoteConfigs(
            self.store,
            self.downlink,
            self.metrics,
            devices=self._known_devices,
            resend_after_ms=int(config.fleet.config_resend_after_s * 1000),
            clock_ms=clock_ms,
        )
        self.tests = TestWatch(
            self.store,
            self.downlink,
            self.metrics,
            route_of=self._route_of,
            complete_within_ms=int(config.test_press.complete_within_s * 1000),
            period_ms=config.test_press.every_days * 86_400_000 or None,
            devices=self.registry.device_ids,
            on_event=self.forwarder.wake,
        )
        self.certs = CertWatch(
            self.store,
            self.downlink,
            self.metrics,
            gateway_id=config.id,
            route_of=self._route_of,
            district_of=self._district_of,
            site_centres=tuple(c.name for c in config.centres),
            warn_days=config.fleet.cert_warn_days,
            on_event=self.forwarder.wake,
        )
        # the video hub only when video is on: aiortc and PyAV are imported only then
        self.video: VideoHub | None = None
        if config.video.enabled:
            from gateway.video.hub import VideoHub

            self.video = VideoHub(
                config.video,
                self.downlink.send,
                signer,
                keyring=self.vault.keyring,
                holders=self.store,
            )
        health = config.health
        self.probe = IntakeProbe(
            signer,
            self.session.settings.client_id,
            lambda topic, payload: self.session.publish(topic, payload, qos=0),
            self.metrics,
            # published over MQTT, heard through the uplink: both must work
            connected=self._connected,
            resubscribe=self.uplink.resubscribe,
            reconnect=self.uplink.reconnect,
            every_ms=int(health.probe_s * 1000),
            deaf_after_ms=int(health.intake_deaf_s * 1000),
        )
        self.disk = DiskWatch(
            self.store,
            int(config.disk_reserve_mb * 1_000_000),
            self.metrics,
            make_event=self._site_event,
            on_event=self.forwarder.wake,
        )
        self.health = Health(
            self.probe,
            self.metrics,
            connected=self._connected,
            centres=[c.name for c in config.centres] + [s.name for s in config.sia],
            failing_centres=self.forwarder.failing,
            centre_down_after_ms=int(health.centre_down_s * 1000),
            disk=self.disk,
            store_stuck_since=lambda: self.intake.store_stuck_since_ms(),
        )
        self.intake = Intake(
            self.store,
            self.registry,
            self.downlink,
            self.metrics,
            route=config.centres_for,
            window_ms=int(config.intake.window_s * 1000),
            max_bytes=config.intake.max_message_bytes,
            batch_max=config.intake.batch_max,
            queue_max=config.intake.queue_max,
            on_backlog=self._on_backlog,
            on_kept=self._on_kept,
            supervisor=self.supervisor,
            secondary=self.secondary,
            on_rtc=self.video.on_rtc if self.video is not None else None,
            on_probe=self.probe.offer,
            on_heartbeats=self._on_heartbeats,
            heartbeat_flush_ms=config.heartbeat_flush_ms,
        )
        self.api = Api(
            self.store,
            self.registry,
            self.downlink,
            self.metrics,
            config.api.tokens,
            connected=lambda: self.session.connected,
            health=self._healthz,
            read_timeout_s=config.api.read_timeout_s,
        )
        self.api.add_routes(
            PrivateRoutes(self.store, self.vault, on_revoked=self.registry.refresh).routes()
        )
        # incidents nobody acknowledged escalate along the chain, from the store's state
        self.escalator = Escalator(
            self.store,
            self.downlink,
            config.incidents.escalation,
            config.incidents.after_s,
            on_step=self._escalated,
        )
        self.api.add_routes(
            IncidentRoutes(
                self.store,
                self.downlink,
                self.metrics,
                config.incidents.procedures(),
                next_escalation_ms=self.escalator.due_ms,
            ).routes()
        )
        # deliveries a centre has not accepted: listed, and refused ones sent again
        self.api.add_routes(DeliveryRoutes(self.store, self.forwarder.wake).routes())
        self.api.add_routes(self.tests.routes())
        self.api.add_routes(self.certs.routes())
        self.api.add_routes(self.configs.routes())
        self.fleet_view = FleetView(
            devices=self._known_devices,
            supervised=lambda device_id: self.supervisor.deadline(device_id) is not None,
            health=self.fleet,
            failed_tests=self.tests.failed,
            certs=lambda: self.certs.known,
            config_states=lambda: {r.device_id: r.state for r in self.configs.drift()},
            rules=VisitRules(
                cert_warn_ms=int(config.fleet.cert_warn_days * 86_400_000),
                low_battery_pct=config.fleet.low_battery_pct,
                outbox_backlog=config.fleet.outbox_backlog,
            ),
        )
        self.api.add_routes(self.fleet_view.routes())
        if self.video is not None:
            from gateway.video import playback, whep

            self.api.add_routes(whep.api_routes(self.video))
            public = signer.public_key
            self.api.add_routes(
                playback.api_routes(
                    playback.Playback(
                        config.video.recordings_dir,
                        self.vault.keyring,
                        lambda _kid: public,
                        self.store.event,
                        self.store.stages,
                    )
                )
            )
        # agent releases and rollouts, when the site's release key is configured
        self.rollouts = _rollouts(config, self.store, self.downlink, self.metrics)
        if self.rollouts is not None:
            self.api.add_routes(self.rollouts.routes())
        # POST /enrol and its admin routes, when this gateway runs from a provisioning site
        self.enrolment = attach_if_site(self.api, self.registry, self.store, config, self.metrics)
        # loaded now, so a bad certificate stops start-up with its name, not a task later
        api = config.api
        self.api_tls = None
        if api.enabled and api.cert_file is not None and api.key_file is not None:
            self.api_tls = tls_context(api.cert_file, api.key_file)
        self.ready = asyncio.Event()

    def _on_message(self, message: Message) -> None:
        self.intake.submit(message)

    def _connected(self) -> bool:
        return self.session.connected and self.uplink.connected

    def _on_backlog(self, behind: bool) -> None:
        if behind:
            self.uplink.pause_reading()
        else:
            self.uplink.resume_reading()

    def _on_connect(self, session_present: bool) -> None:
        now_ms = wall_ms()
        self.supervisor.resume(now_ms)
        self.probe.connection_up(now_ms)

    def _on_disconnect(self) -> None:
        self.supervisor.pause()
        self.probe.connection_down()

    def _route_of(self, device_id: str) -> tuple[str, ...] | None:
        device = self.registry.device(device_id)
        if device is None or device.revoked:
            return None
        return self.config.centres_for(device.district)

    def _known_devices(self) -> list[Device]:
        """Every device known and not revoked."""
        found = (self.registry.device(d) for d in self.registry.device_ids())
        return [d for d in found if d is not None]

    def _on_heartbeats(self, beats: list[KeptHeartbeat]) -> None:
        self.fleet.heartbeats(beats)
        self.configs.heartbeats(beats)

    def _district_of(self, device_id: str) -> str:
        device = self.registry.device(device_id)
        return device.district if device is not None else ""

    def _on_kept(self, items: list[Incoming]) -> None:
        self.tests.kept(items)
        if self.rollouts is not None:
            self.rollouts.kept(items)  # devices' update reports
        self.forwarder.wake()

    def _on_first_delivery(self, delivery: Delivery) -> None:
        if delivery.type == "alert":
            self.downlink.ack(delivery.device_id, delivery.event_id, "delivered")
            self.tests.delivered(delivery.event_id)

    def _site_event(self, state: DiskState) -> Incoming | None:
        """A status event about the gateway itself, signed by it, as supervision makes a
        device's (gateway/supervise.py): for the HTTPS centres, which check it with the
        gateway's key; an SIA receiver has no code for it."""
        centres = tuple(c.name for c in self.config.centres)
        if not centres:
            return None
        return self.downlink.event(self.config.id, Status(state=state), centres)

    def _escalated(self, _incident: Incident, centre: str) -> None:
        self.metrics.escalations.labels(centre).inc()
        self.forwarder.wake()  # the step's event is in the outbox: send it now

    def _healthz(self, detail: bool) -> tuple[int, dict[str, Any]]:
        report = self.health.report()
        return report.http_status, report.body if detail else report.summary

    async def run(self) -> None:
        try:
            # the devices' keys, before any message can arrive
            await self.registry.reload()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.session.run(), name="mqtt")
                tasks.create_task(self.uplink.run(), name="uplink")
                tasks.create_task(self.intake.run(), name="intake")
                tasks.create_task(self.forwarder.run(), name="forward")
                self.supervisor.load(await self.store.devices(), wall_ms())
                await self.secondary.load_from(self.store)
                tasks.create_task(self.supervisor.run(), name="supervise")
                tasks.create_task(self.escalator.run(), name="escalation")
                tasks.create_task(self.tests.run(), name="test presses")
                tasks.create_task(self.configs.run(), name="remote config")
                if self.rollouts is not None:
                    tasks.create_task(self.rollouts.run(), name="rollouts")
                site_dir, api_cert = self.config.enrol.site_dir, self.config.api.cert_file
                if site_dir is not None:
                    read = functools.partial(site_certificates, site_dir, api_cert)
                    tasks.create_task(self.certs.run(read), name="certificates")
                if self.config.intake.registry_reload_s > 0:
                    reload_s = self.config.intake.registry_reload_s
                    tasks.create_task(self.registry.watch(reload_s), name="registry")
                tasks.create_task(sdnotify.watchdog_pings(self.health.watchdog_ok), name="watchdog")
                # also with no reserve (0): its WAL checkpoints keep the database file small
                tasks.create_task(self.disk.run(), name="disk")
                if self.video is not None:
                    tasks.create_task(self.video.run(), name="video")
                if self.config.api.enabled:
                    api = self.config.api
                    tasks.create_task(self.api.serve(api.host, api.port, self.api_tls), name="api")
                await self.session.wait_connected()
                await self.uplink.start()
                self.probe.start(wall_ms())
                tasks.create_task(self.probe.run(), name="probe")
                self.ready.set()
                sdnotify.notify("READY=1")
                log.info("gateway %s: listening on %s", self.config.id, self.uplink.describe())
        finally:
            await self.uplink.close()
            await self.session.close()
            await self.store.close()


def make_uplink(
    config: GatewayConfig, session: Session, on_message: Callable[[Message], None]
) -> Uplink:
    """The uplink `[uplink] kind` names: the session's subscription, or a RabbitMQ queue."""
    u = config.uplink
    if u.kind == "amqp":
        return AmqpUplink(
            u.amqp_url,
            on_message,
            other_nodes=list(broker_addresses(u.other_nodes)),
            password=u.password,
            queue=u.queue,
            prefetch=u.prefetch,
        )
    group = config.mqtt.shared_group
    return MqttUplink(session, shared_up_filter(group) if group else UP_FILTER)


def _rollouts(
    config: GatewayConfig, store: Store, downlink: Downlink, metrics: Metrics
) -> Rollouts | None:
    updates = config.updates
    if not updates.release_public_key:
        return None
    releases = Releases(updates.dir, public_key_from_b64(updates.release_public_key))
    return Rollouts(
        releases,
        store,
        downlink.send,
        metrics,
        public_url=updates.public_url,
        pause_failed_pct=updates.pause_failed_pct,
        reoffer_ms=int(updates.reoffer_s * 1000),
        clock_ms=wall_ms,
    )
