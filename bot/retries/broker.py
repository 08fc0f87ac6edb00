"""One robust AMQP connection with a confirming channel, opened in the background.

A replica must start and serve commands while RabbitMQ is down, so nothing waits for the
broker at start: `Broker.start` returns at once and the connection keeps trying (aio-pika's
robust connection reconnects and re-declares the queues by itself after that).
`Broker.publish` returns only after the broker confirmed the message, or raises
`BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from aio_pika import DeliveryMode, Message, RobustConnection
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustChannel, HeadersType
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from bot import metrics, runtime
from bot.logging import get_logger
from bot.retries.topology import Topology, declare
from bot.settings import Settings

log = get_logger(__name__)

# How long a publish may wait for its confirm before the job goes to the outbox instead.
PUBLISH_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0
# The header a dead-lettered job carries its reason in ("<code>: <detail>").
REASON_HEADER = "reason"
Declarer = Callable[[AbstractChannel], Awaitable[dict[str, AbstractQueue]]]


class BrokerUnavailable(Exception):
    """The broker did not confirm the message (down, unreachable or refusing)."""


class Broker:
    """A robust connection, one confirming channel and the declared topology."""

    def __init__(
        self,
        amqp_url: str,
        topology: Topology,
        name: str,
        *,
        prefetch: int = 0,
        declare_more: Declarer | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.declare_more = declare_more  # queues of others on this connection (channels)
        self.topology = topology
        self.name = name
        self.prefetch = prefetch
        self.queues: dict[str, AbstractQueue] = {}
        self.declared = asyncio.Event()
        self._connection: RobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        name: str,
        *,
        prefetch: int = 0,
        declare_more: Declarer | None = None,
    ) -> Broker:
        """`AMQP_URL` with the topology of `BOT_QUEUE_PREFIX` and `BOT_RETRY_*`'s delays."""
        topology = Topology.from_settings(settings)
        return cls(settings.amqp_url, topology, name, prefetch=prefetch, declare_more=declare_more)

    async def start(self) -> None:
        """Begin connecting in the background; returns at once."""
        # fail_fast=False: when the broker is down at start, keep trying instead of raising.
        self._connection = RobustConnection(
            make_url(self.amqp_url),
            client_properties={"connection_name": self.name},
            reconnect_interval=1,
            fail_fast=False,
        )
        self._task = asyncio.create_task(self._open(self._connection))

    async def wait_declared(self, seconds: float) -> bool:
        """Wait until connected with the topology declared; False after `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                await self.declared.wait()
        except TimeoutError:
            return False
        return True

    async def _open(self, connection: RobustConnection) -> None:
        await connection.connect(timeout=CONNECT_TIMEOUT)
        while True:
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                assert isinstance(channel, AbstractRobustChannel)
                if self.prefetch:
                    await channel.set_qos(prefetch_count=self.prefetch)
                queues = await declare(channel, self.topology)
                if self.declare_more is not None:
                    queues.update(await self.declare_more(channel))
                self.queues = queues
            except CONNECTION_EXCEPTIONS as exc:
                log.error("rabbitmq_declare_failed", error=repr(exc))
                await asyncio.sleep(1)
                continue
            self._channel = channel
            self.declared.set()
            log.info("rabbitmq_connected", prefix=self.topology.prefix)
            return

    @property
    def channel(self) -> AbstractRobustChannel:
        """The channel (only once `declared` is set)."""
        if self._channel is None:
            raise BrokerUnavailable("not connected yet")
        return self._channel

    @property
    def up(self) -> bool:
        """Connected, with the channel open and the topology declared."""
        conn, channel = self._connection, self._channel
        return bool(
            conn is not None
            and channel is not None
            and conn.connected.is_set()
            and not conn.is_closed
            and not channel.is_closed
        )

    async def ready(self) -> bool:
        """The /readyz check (and `bot_dependency_up{dependency="rabbitmq"}`)."""
        return self.up

    async def publish(
        self,
        body: bytes,
        routing_key: str,
        *,
        message_id: str,
        user_id: str = "",
        reason: str | None = None,
    ) -> None:
        """Publish a persistent message and wait for the broker's confirm."""
        if not self.up:
            raise BrokerUnavailable("rabbitmq is not connected")
        headers: HeadersType = {"user_id": user_id}
        if reason is not None:
            headers[REASON_HEADER] = reason
        message = Message(
            body,
            delivery_mode=DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=message_id,
            headers=headers,
        )
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self.channel.default_exchange.publish(message, routing_key, mandatory=True)
        except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
            raise BrokerUnavailable(f"publish not confirmed: {exc!r}") from None

    async def dead_letter(
        self, body: bytes, code: str, detail: str, *, message_id: str, user_id: str = ""
    ) -> None:
        """Park a job in the dead-letter queue with its reason (header `reason`, shown by
        `bot dlq list`), once the broker confirmed it; counted by `code` (a DEAD_REASONS)."""
        assert code in metrics.DEAD_REASONS, code
        await self.publish(
            body,
            self.topology.dead,
            message_id=message_id,
            user_id=user_id,
            reason=f"{code}: {detail}",
        )
        metrics.DEAD_LETTERS.labels(reason=code).inc()
        log.warning("retry_job_dead_lettered", message_id=message_id, reason=code, detail=detail)

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting per role: work, delay (all levels), dead."""
        depths = {"work": 0, "delay": 0, "dead": 0}
        topo = self.topology
        # The raw channel: aio-pika's robust channel answers a passive declare from its cache.
        raw = await self.channel.get_underlay_channel()
        for name in topo.all:
            res = await raw.queue_declare(name, passive=True, timeout=PUBLISH_TIMEOUT)
            role = "work" if name == topo.work else "dead" if name == topo.dead else "delay"
            depths[role] += res.message_count or 0
        return depths

    async def close(self) -> None:
        if self._task is not None:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await runtime.cancel_and_wait(self._task)
        if self._connection is not None:
            try:  # bounded, as every step of a shutdown: a broker that never answers the close
                async with asyncio.timeout(runtime.STOP_TIMEOUT):
                    await self._connection.close()
            except TimeoutError:
                log.warning("rabbitmq_close_timed_out")
            except CONNECTION_EXCEPTIONS:
                pass
        metrics.DEPENDENCY_UP.labels(dependency="rabbitmq").set(0)
