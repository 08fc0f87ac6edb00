"""`bot dlq list | replay [--all|ID...] | purge`: the dead-letter queue, for operators.

Exit codes: 0 done; 1 some requested IDs are not in the queue (the others were replayed);
3 the broker cannot be reached; 2 usage or settings errors (argparse and the CLI).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from bot.core.types import Job
from bot.retries.broker import REASON_HEADER
from bot.retries.jobs import decode, encode
from bot.retries.topology import Topology, declare
from bot.settings import Settings

EXIT_MISSING = 1
EXIT_BROKER = 3
_TIMEOUT = 10.0


@dataclass(slots=True)
class DeadJob:
    """A dead-lettered message: its job (None when the body is not one) and why it is here."""

    job: Job | None
    message: AbstractIncomingMessage

    @property
    def message_id(self) -> str:
        return self.job.message_id if self.job else self.message.message_id or "?"

    @property
    def reason(self) -> str:
        """The worker's or relay's `reason` header; else the broker's own dead-letter reason
        (a job the broker dropped itself, such as at the work queue's delivery limit)."""
        headers = self.message.headers or {}
        reason = headers.get(REASON_HEADER)
        if isinstance(reason, (str, bytes)):
            return reason.decode(errors="replace") if isinstance(reason, bytes) else reason
        first = headers.get("x-first-death-reason")
        return f"broker: {first}" if isinstance(first, str) else "-"

    def line(self) -> str:
        if self.job is None:
            user = (self.message.headers or {}).get("user_id") or "?"
            attempts, seen, question = "-", "-", "(not a job)"
        else:
            user, attempts = self.job.user_id, str(self.job.attempt)
            seen = datetime.fromtimestamp(self.job.first_seen, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            question = self.job.question.replace("\n", " ")
        if len(question) > 40:
            question = question[:39] + "…"
        return (
            f"{self.message_id:<24} {user!s:<20} {attempts:>8} {seen:<20} {question:<40} "
            f"{self.reason}"
        )


HEADER = (
    f"{'MESSAGE_ID':<24} {'USER_ID':<20} {'ATTEMPTS':>8} {'FIRST_SEEN':<20} {'QUESTION':<40} REASON"
)


async def _fetch(channel: AbstractChannel, topo: Topology) -> list[DeadJob]:
    """Every dead job, held unacked (closing the channel without acking puts them back)."""
    queues = await declare(channel, topo)
    dead = queues[topo.dead]
    out: list[DeadJob] = []
    while True:
        msg = await dead.get(no_ack=False, fail=False, timeout=_TIMEOUT)
        if msg is None:
            return out
        try:
            job: Job | None = decode(msg.body)[0]
        except ValueError:
            job = None  # poison: listed and purged, never replayed
        out.append(DeadJob(job, msg))


async def _with_channel(settings: Settings, action: Callable[..., object]) -> int:
    topo = Topology.from_settings(settings)
    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=_TIMEOUT)
    except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
        print(f"bot dlq: RabbitMQ at AMQP_URL does not answer ({exc!r})")
        return EXIT_BROKER
    try:
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            result = await action(channel, topo)
            assert isinstance(result, int)
            return result
    except (TimeoutError, *CONNECTION_EXCEPTIONS) as exc:
        print(f"bot dlq: RabbitMQ failed mid-way ({exc!r}); nothing acked was lost")
        return EXIT_BROKER


async def _list(channel: AbstractChannel, topo: Topology) -> int:
    jobs = await _fetch(channel, topo)
    if not jobs:
        print(f"no dead-lettered jobs in {topo.dead}")
        return 0
    print(HEADER)
    for dj in jobs:
        print(dj.line())
    print(f"{len(jobs)} dead-lettered job(s) in {topo.dead}")
    return 0


async def _replay(channel: AbstractChannel, topo: Topology, ids: set[str] | None) -> int:
    jobs = await _fetch(channel, topo)
    found: set[str] = set()
    replayed = 0
    for dj in jobs:
        if ids is not None and dj.message_id not in ids:
            continue
        found.add(dj.message_id)
        if dj.job is None:
            print(f"not replayed {dj.message_id}: not a job ({dj.reason})")
            continue
        dj.job.attempt = 0  # a fresh set of attempts
        await channel.default_exchange.publish(
            aio_pika.Message(
                encode(dj.job, time.time()),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
                message_id=dj.job.message_id,
                headers={"user_id": dj.job.user_id},
            ),
            topo.work,
            mandatory=True,
        )
        await dj.message.ack()  # only after the broker confirmed the copy
        replayed += 1
        print(f"replayed {dj.job.message_id} (user {dj.job.user_id})")
    print(f"{replayed} job(s) re-queued to {topo.work}")
    missing = sorted((ids or set()) - found)
    if missing:
        print(f"not in {topo.dead}: {', '.join(missing)}")
        return EXIT_MISSING
    return 0


async def _purge(channel: AbstractChannel, topo: Topology) -> int:
    queues = await declare(channel, topo)
    result = await queues[topo.dead].purge()
    print(f"purged {result.message_count} dead-lettered job(s) from {topo.dead}")
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `bot dlq` action; returns the exit code."""
    if args.action == "list":
        return asyncio.run(_with_channel(settings, _list))
    if args.action == "purge":
        return asyncio.run(_with_channel(settings, _purge))
    if args.all == bool(args.ids):
        print("bot dlq replay: give --all or message IDs (not both)")
        return 2
    ids = None if args.all else set(args.ids)

    async def replay(channel: AbstractChannel, topo: Topology) -> int:
        return await _replay(channel, topo, ids)

    return asyncio.run(_with_channel(settings, replay))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], func: object) -> None:
    """Register `bot dlq ...` on the CLI; `func(args)` runs it."""
    dlq = sub.add_parser("dlq", help="inspect, re-queue or drop dead-lettered retry jobs")
    actions = dlq.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show the dead-lettered jobs (they stay queued)")
    replay = actions.add_parser("replay", help="re-queue dead-lettered jobs for new attempts")
    replay.add_argument("--all", action="store_true", help="every dead-lettered job")
    replay.add_argument("ids", nargs="*", default=[], metavar="ID", help="message ids")
    actions.add_parser("purge", help="drop every dead-lettered job")
    dlq.set_defaults(func=func)
