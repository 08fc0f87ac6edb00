"""The retry topology, declared idempotently by every process that uses it.

    <prefix>.work          jobs ready for an attempt (the worker consumes it)
    <prefix>.delay.<ms>    one per backoff level; a message waits there for the queue's TTL and
                           is then dead-lettered back to <prefix>.work
    <prefix>.dead          the parking lot: jobs that used up their attempts (`bot dlq ...`)

All queues are quorum queues: they are the durable, Raft-replicated queue type RabbitMQ
recommends, and since 3.10 they dead-letter *at least once* (`x-dead-letter-strategy`) so a
job moving from a delay queue to the work queue cannot be lost in a broker crash, which
classic queues' at-most-once dead-lettering does not promise. At-least-once needs
`x-overflow: reject-publish`. Every message is published persistent and with confirms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractQueue

from bot.retries.jobs import delay_levels
from bot.settings import Settings

# A job whose delivery keeps killing the worker goes to the parking lot instead of looping:
# the worker parks it itself, with its reason and an apology, one delivery before the broker
# would (silently) at this limit.
WORK_DELIVERY_LIMIT = 50


@dataclass(frozen=True, slots=True)
class Topology:
    """Queue names and backoff levels for one queue prefix."""

    prefix: str
    levels: tuple[int, ...]
    delivery_limit: int = WORK_DELIVERY_LIMIT

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        levels = delay_levels(settings.retry_base_delay, settings.retry_max_delay)
        # The module's limit as it is now (a test lowers it to see the limit in seconds).
        return cls(settings.queue_prefix, tuple(levels), WORK_DELIVERY_LIMIT)

    @property
    def work(self) -> str:
        return f"{self.prefix}.work"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    def delay(self, ms: int) -> str:
        return f"{self.prefix}.delay.{ms}"

    @property
    def delays(self) -> list[str]:
        return [self.delay(ms) for ms in self.levels]

    @property
    def all(self) -> list[str]:
        return [self.work, *self.delays, self.dead]


async def declare(channel: AbstractChannel, topo: Topology) -> dict[str, AbstractQueue]:
    """Declare every queue (idempotent: same names, same arguments)."""
    quorum: dict[str, Any] = {"x-queue-type": "quorum"}
    queues = {
        topo.work: await channel.declare_queue(
            topo.work,
            durable=True,
            arguments={
                **quorum,
                "x-delivery-limit": topo.delivery_limit,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topo.dead,
            },
        ),
        topo.dead: await channel.declare_queue(topo.dead, durable=True, arguments=quorum),
    }
    for ms in topo.levels:
        queues[topo.delay(ms)] = await channel.declare_queue(
            topo.delay(ms),
            durable=True,
            arguments={
                **quorum,
                "x-message-ttl": ms,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": topo.work,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
    return queues


async def delete(channel: AbstractChannel, prefix: str, levels: tuple[int, ...]) -> None:
    """Delete a prefix's queues (tests and tools; never called by the stack itself)."""
    for name in Topology(prefix, levels).all:
        await channel.queue_delete(name)
