"""Durable retries of failed upstream calls: RabbitMQ topology, publisher, outbox, worker, DLQ.

A replica whose upstream call failed hands the job to `RetryQueue.defer` (the `Deferrer` of
`bot.core.service`), which answers only once the broker confirmed it or the Redis outbox holds
it. The worker (`bot worker`) retries with backoff and stores the reply in the user's inbox.
"""
