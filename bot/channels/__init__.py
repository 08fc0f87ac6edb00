"""Chat channels: platform webhooks in, one paced and ordered delivery path out.

`intake` verifies nothing and knows no platform: it claims an update's dedupe key and queues
it durably. `processor` answers queued updates through the core (`BotService`), one chat at a
time; `delivery` sends the answers, paced, in order per conversation. The platform adapters
(`telegram`) turn a request into an `Inbound` and an `Outbound` into a platform call.
"""
