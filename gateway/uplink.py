"""Where the devices' messages come from: one small interface, two brokers.

- `MqttUplink` (the default, mosquitto): a subscription on the gateway's own MQTT session,
  shared between instances (`$share/<group>/...`, MQTT v5) or plain.
- `AmqpUplink` (a RabbitMQ cluster): RabbitMQ 3.10 speaks MQTT 3.1.1 only and its `$share`
  subscriptions deliver nothing (FIELD-NOTES-SCALE), so the instances consume one quorum
  queue bound to `amq.topic` over AMQP 0-9-1, as competing consumers; the queue is
  replicated, so it outlives the node it was led from. Bells still publish over MQTT, and
  acks and downlink still go out over the gateway's MQTT session either way.

Either way every message reaches the intake as an `ansimi.mqtt.Message` with the MQTT
topic, so nothing past this module knows which broker it came through. The AMQP delivery is
acknowledged when the intake has it, as paho acks a QoS 1 PUBLISH on receipt: what holds
an alert until it is kept is the device's outbox (it resends until `received`), not the
broker. Why aio-pika: a maintained asyncio AMQP 0-9-1 client (on aiormq); pika is blocking.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from ansimi.mqtt import Message, Session
from protocol.topics import UP_FILTER

if TYPE_CHECKING:
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractIncomingMessage,
        AbstractQueue,
    )

log = logging.getLogger(__name__)

# RabbitMQ's MQTT plugin publishes to this exchange, with '/' and '.' of the topic swapped
AMQ_TOPIC: Final = "amq.topic"
RECONNECT_MIN_S: Final = 0.5
RECONNECT_MAX_S: Final = 15.0
CONNECT_TIMEOUT_S: Final = 10.0


_TO_AMQP: Final = str.maketrans("/.+", "./*")
_TO_MQTT: Final = str.maketrans("./", "/.")


def amqp_routing_key(mqtt_topic: str) -> str:
    """The routing key RabbitMQ gives an MQTT topic (or filter: '+' becomes '*')."""
    return mqtt_topic.translate(_TO_AMQP)


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic a bell published on, from the routing key RabbitMQ gave it."""
    return routing_key.translate(_TO_MQTT)


UP_ROUTING_KEY: Final = amqp_routing_key(UP_FILTER)


class Uplink(Protocol):
    """The devices' messages into `on_message`; what the intake and its probe need of it."""

    @property
    def connected(self) -> bool: ...

    def describe(self) -> str: ...

    async def run(self) -> None:
        """Keep the uplink connected until cancelled (nothing to do for MQTT's)."""

    async def start(self) -> None:
        """Return once messages flow: subscribed, or consuming."""

    async def resubscribe(self) -> object: ...

    def reconnect(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def close(self) -> None: ...


class MqttUplink:
    """The uplink as a subscription on the gateway's MQTT session (which it does not own)."""

    def __init__(self, session: Session, subscription: str) -> None:
        self._session = session
        self.subscription = subscription

    @property
    def connected(self) -> bool:
        return self._session.connected

    def describe(self) -> str:
        return self.subscription

    async def run(self) -> None:
        return None  # the gateway runs the session: it carries the downlink too

    async def start(self) -> None:
        await self._session.wait_connected()
        await self._session.subscribe([(self.subscription, 1)])

    async def resubscribe(self) -> object:
        return await self._session.resubscribe()

    def reconnect(self) -> None:
        self._session.reconnect()

    def pause_reading(self) -> None:
        self._session.pause_reading()

    def resume_reading(self) -> None:
        self._session.resume_reading()

    async def close(self) -> None:
        return None


class AmqpUplink:
    """The uplink as a consumer of a quorum queue bound to `amq.topic` (RabbitMQ)."""

    def __init__(
        self,
        url: str,
        on_message: Callable[[Message], None],
        *,
        other_nodes: Sequence[tuple[str, int]] = (),
        password: str = "",
        queue: str = "ansimi-uplink",
        prefetch: int = 200,
    ) -> None:
        from yarl import URL

        parsed = URL(url)
        # the password comes from its file: a URL with one would put it in logs and the TOML
        first = parsed.with_password(password) if password else parsed
        # a cluster's other nodes, same user and vhost, tried in turn when one is lost
        self._urls = [first, *(first.with_host(h).with_port(p) for h, p in other_nodes)]
        self._url_index = 0
        self._shown = str(parsed.with_password(None))
        self._on_message = on_message
        self._queue_name = queue
        self._prefetch = prefetch
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._paused = False
        self._lost = asyncio.Event()
        self._consuming = asyncio.Event()
        self._closing = False

    @property
    def connected(self) -> bool:
        return (
            self._consuming.is_set()
            and self._connection is not None
            and not (self._connection.is_closed)
        )

    def describe(self) -> str:
        return f"AMQP queue {self._queue_name} ({UP_ROUTING_KEY}) at {self._shown}"

    async def run(self) -> None:
        import aio_pika

        delay = RECONNECT_MIN_S
        while not self._closing:
            url = self._urls[self._url_index]
            self._shown = str(url.with_password(None))
            try:
                connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("uplink: cannot reach %s: %s; again in %.1fs", self._shown, exc, delay)
                self._url_index = (self._url_index + 1) % len(self._urls)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            self._connection = connection
            # aio-pika's closed() waits for our own close only: a reset connection (its node
            # killed) is told through close_callbacks, and so is a closed channel
            lost = self._lost = asyncio.Event()
            connection.close_callbacks.add(_setter(lost))
            try:
                await self._declare_and_consume()
                delay = RECONNECT_MIN_S
                log.info("uplink: consuming %s", self.describe())
                await lost.wait()
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("uplink: %s lost: %s", self._shown, exc)
            finally:
                self._consuming.clear()
                self._consumer_tag = None
                await _close(connection)
            if not self._closing:
                log.warning("uplink: connection to %s closed; reconnecting", self._shown)
                self._url_index = (self._url_index + 1) % len(self._urls)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _declare_and_consume(self) -> None:
        assert self._connection is not None
        channel = await self._connection.channel()
        lost = self._lost
        # a channel the broker closed (its queue gone, say) stops deliveries: start again
        channel.close_callbacks.add(lambda *_: lost.set() if self._channel is channel else None)
        # bounds what the broker hands this instance ahead of the intake: the rest waits in
        # the replicated queue for whichever instance asks first
        await channel.set_qos(prefetch_count=self._prefetch)
        # quorum: replicated over the cluster's nodes, so the loss of one keeps the queue
        queue = await channel.declare_queue(
            self._queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(AMQ_TOPIC, routing_key=UP_ROUTING_KEY)
        self._channel, self._queue = channel, queue
        if not self._paused:
            self._consumer_tag = await queue.consume(self._deliver)
        self._consuming.set()

    async def _deliver(self, incoming: AbstractIncomingMessage) -> None:
        # redelivered or not, the intake takes it: exact duplicates are kept once
        message = Message(mqtt_topic(incoming.routing_key or ""), incoming.body, qos=1)
        self._on_message(message)
        await incoming.ack()

    async def start(self) -> None:
        await self._consuming.wait()

    async def resubscribe(self) -> object:
        """Declare, bind and consume again on a fresh channel (the probe's first repair)."""
        if not self.connected:
            return None  # run() declares and consumes again once reconnected
        old = self._channel
        self._consuming.clear()
        self._consumer_tag = None
        try:
            # a node whose network is gone answers nothing, and aio-pika hears of it only
            # at the heartbeat (a minute or more): bounded, so the repair ladder goes on
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self._declare_and_consume()
        except TimeoutError:
            log.warning("uplink: %s does not answer; dialling the next node", self._shown)
            self._lost.set()  # run() closes this connection (bounded) and dials the next
            return None
        if old is not None and not old.is_closed:
            await _close(old)
        return None

    def reconnect(self) -> None:
        self._lost.set()  # run() closes this connection and dials the next node

    def pause_reading(self) -> None:
        self._paused = True
        queue, tag = self._queue, self._consumer_tag
        self._consumer_tag = None
        if queue is not None and tag is not None:
            asyncio.get_running_loop().create_task(_quietly(queue.cancel(tag)))

    def resume_reading(self) -> None:
        self._paused = False
        if self._queue is not None and self._consumer_tag is None and self.connected:
            asyncio.get_running_loop().create_task(self._consume_again(self._queue))

    async def _consume_again(self, queue: AbstractQueue) -> None:
        try:
            self._consumer_tag = await queue.consume(self._deliver)
        except Exception as exc:  # the connection went: run() consumes again on reconnect
            log.warning("uplink: could not resume consuming: %s", exc)

    async def close(self) -> None:
        self._closing = True
        self._lost.set()
        if self._connection is not None:
            await _close(self._connection)


def _setter(event: asyncio.Event) -> Callable[..., None]:
    """A close callback (aio-pika passes the closer and the reason) that sets `event`."""
    return lambda *_: event.set()


async def _close(connection: AbstractConnection | AbstractChannel) -> None:
    """Close, bounded: a connection (or channel) whose node is gone may never answer."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await connection.close()
    except Exception as exc:
        log.debug("uplink: close: %s", exc)


async def _quietly(cancel: Awaitable[object]) -> None:
    try:
        await cancel
    except Exception as exc:  # a closed channel has no consumer to cancel
        log.debug("uplink: consumer cancel: %s", exc)
