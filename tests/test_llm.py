"""The LLM upstream (`UPSTREAM_KIND=openai`): the stub speaks OpenAI's wire format (the official
client talks to it unchanged), and the bot's client against that stub, error class by error
class, for streams cut halfway, slow first tokens, 429s with Retry-After, and the answers that
are not whole (none cached). Then the replica in-process: apologies, the model pref, and
`POST /v1/messages` streamed as Server-Sent Events."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import requests
import yaml
from aiohttp import ClientResponse
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bot.answers import INCOMPLETE_NOTES, Ask
from bot.errors import UpstreamRejected, UpstreamUnavailable
from bot.settings import SettingsError, load_settings
from bot.upstream import OpenAIClient, parse_duration, retry_after
from loadtests import stream as stream_load
from tests.support import (
    AppClient,
    Stack,
    Upstream,
    claim_redis_db,
    parse_events,
    release_redis_db,
    stack_dir,
    stack_env,
    unique,
)

ROOT = Path(__file__).resolve().parent.parent
_LIMITS = {"BOT_RATE_LIMIT": "1000/second", "BOT_RATE_BURST": "1000"}
_OPENAI = {"UPSTREAM_KIND": "openai", "UPSTREAM_MODEL": "stub-model", **_LIMITS}


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the stub, as the official client sees it ------------------------------------------------


def official(upstream: Upstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="sk-stub", max_retries=0)


async def test_official_client_reads_a_completion_with_usage_and_headers(
    upstream: Upstream,
) -> None:
    client = official(upstream)
    raw = await client.chat.completions.with_raw_response.create(
        model="m-1", messages=[{"role": "user", "content": "what is a pulsar?"}], max_tokens=50
    )
    completion = raw.parse()
    assert raw.headers["x-request-id"] == "req_stub_1"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
    assert completion.choices[0].message.content == "[1] You asked: what is a pulsar?"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "m-1"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    assert upstream.stats().last["max_tokens"] == 50
    await client.close()


async def test_official_client_streams_pieces_then_usage(upstream: Upstream) -> None:
    client = official(upstream)
    stream = await client.chat.completions.create(
        model="m-1",
        messages=[{"role": "user", "content": "tell me about stars"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == "[1] You asked: tell me about stars"
    assert len([p for p in pieces if p]) == 7  # word by word
    assert finish == "stop"
    assert usage is not None and usage.prompt_tokens == 4 and usage.completion_tokens == 7
    await client.close()


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (400, None, openai.BadRequestError),
        (401, "invalid_api_key", openai.AuthenticationError),
        (403, None, openai.PermissionDeniedError),
        (404, "model_not_found", openai.NotFoundError),
        (422, None, openai.UnprocessableEntityError),
        (429, "rate_limit_exceeded", openai.RateLimitError),
        (500, None, openai.InternalServerError),
    ],
)
async def test_official_client_maps_the_stubs_errors(
    upstream: Upstream, status: int, code: str | None, error: type[openai.APIStatusError]
) -> None:
    upstream.llm(status=status, code=code or "", headers={"Retry-After": "7"})
    client = official(upstream)
    with pytest.raises(error) as raised:
        await client.chat.completions.create(
            model="m-1", messages=[{"role": "user", "content": "hi"}]
        )
    assert raised.value.status_code == status
    assert raised.value.code == code
    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.request_id == "req_stub_1"
    await client.close()


async def test_official_client_gets_a_bad_request_for_a_malformed_body(
    upstream: Upstream,
) -> None:
    client = official(upstream)
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m-1", messages=[])
    await client.close()


# --- the bot's client against the stub -------------------------------------------------------


async def bot_client(upstream: Upstream, **kw: Any) -> tuple[OpenAIClient, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    opts: dict[str, Any] = {"model": "m-1", "key": "sk-test", "prices": {"m-1": (1.0, 2.0)}}
    opts.update(kw)
    return OpenAIClient(session, upstream.url, **opts), session


async def collect(
    client: OpenAIClient, question: str = "what is a pulsar?", model: str = ""
) -> tuple[Any, list[str]]:
    pieces: list[str] = []

    async def sink(piece: str) -> None:
        pieces.append(piece)

    return await client.answer(question, [], Ask(model, sink)), pieces


async def test_streams_pieces_sends_the_settings_and_counts_tokens_and_cost(
    upstream: Upstream,
) -> None:
    client, session = await bot_client(
        upstream, system_prompt="Be brief.", max_tokens=64, temperature=0.2
    )
    before = (
        sample("bot_upstream_tokens_total", kind="prompt", model="m-1"),
        sample("bot_upstream_tokens_total", kind="completion", model="m-1"),
        sample("bot_upstream_cost_usd_total", model="m-1"),
    )
    answer, pieces = await collect(client)
    await session.close()

    assert answer.text == "[1] You asked: what is a pulsar?" and answer.cacheable
    assert "".join(pieces) == answer.text and len(pieces) == 7
    last = upstream.stats().last
    assert last["stream"] is True and last["max_tokens"] == 64 and last["temperature"] == 0.2
    assert last["context"] == [{"role": "system", "content": "Be brief."}]
    assert last["authorization"] == "Bearer sk-test"
    # prompt: "Be brief." + "what is a pulsar?" = 6 words; completion: 7 words.
    after = (
        sample("bot_upstream_tokens_total", kind="prompt", model="m-1"),
        sample("bot_upstream_tokens_total", kind="completion", model="m-1"),
        sample("bot_upstream_cost_usd_total", model="m-1"),
    )
    assert after[0] - before[0] == 6 and after[1] - before[1] == 7
    assert after[2] - before[2] == pytest.approx((6 * 1.0 + 7 * 2.0) / 1e6)


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "context_length_exceeded"), (401, "invalid_api_key"), (403, ""), (404, ""), (422, "")],
)
async def test_permanent_errors_are_rejections_with_the_providers_code(
    upstream: Upstream, status: int, code: str
) -> None:
    upstream.llm(status=status, code=code)
    counted = code or "invalid_request_error" if status != 403 else "permission_denied"
    counted = {404: "not_found_error"}.get(status, counted)
    before = sample("bot_upstream_errors_total", status=str(status), code=counted)
    client, session = await bot_client(upstream)
    with capture_logs() as events, pytest.raises(UpstreamRejected) as raised:
        await client.answer("q", [])
    await session.close()
    assert (raised.value.status, raised.value.code) == (status, counted)
    assert sample("bot_upstream_errors_total", status=str(status), code=counted) == before + 1
    assert upstream.stats().calls == 1
    (logged,) = [e for e in events if e["event"] == "upstream_rejected"]
    assert (logged["status"], logged["code"], logged["model"]) == (status, counted, "m-1")
    assert logged["provider_message"] == f"stub error {status}"
    assert "sk-test" not in repr(events)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
async def test_transient_errors_are_unavailable(upstream: Upstream, status: int) -> None:
    upstream.llm(status=status)
    client, session = await bot_client(upstream)
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.answer("q", [])
    await session.close()
    assert str(status) in raised.value.reason


async def test_a_429_with_retry_after_says_how_long_to_wait(upstream: Upstream) -> None:
    client, session = await bot_client(upstream)
    upstream.llm(status=429, code="rate_limit_exceeded", headers={"Retry-After": "12"})
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.answer("q", [])
    assert raised.value.retry_after == 12
    # No Retry-After: the reset of the budget that ran out.
    upstream.llm(
        status=429,
        headers={
            "x-ratelimit-remaining-requests": "5",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "1m30s",
        },
    )
    with pytest.raises(UpstreamUnavailable) as raised:
        await client.answer("q", [])
    assert raised.value.retry_after == 90
    await session.close()


async def test_a_quota_429_is_counted_by_its_code(upstream: Upstream) -> None:
    before = sample("bot_upstream_errors_total", status="429", code="insufficient_quota")
    upstream.llm(status=429, code="insufficient_quota")
    client, session = await bot_client(upstream)
    with pytest.raises(UpstreamUnavailable):
        await client.answer("q", [])
    await session.close()
    after = sample("bot_upstream_errors_total", status="429", code="insufficient_quota")
    assert after == before + 1


def test_reset_durations_and_retry_after_forms() -> None:
    assert parse_duration("6m0s") == 360
    assert parse_duration("20ms") == pytest.approx(0.02)
    assert parse_duration("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_duration("2") == 2
    assert parse_duration("soon") is None
    assert retry_after(429, {"retry-after-ms": "1500"}) == 1.5
    assert retry_after(503, {"Retry-After": "3"}) == 3
    assert retry_after(500, {"Retry-After": "3"}) is None


async def test_a_stream_cut_halfway_keeps_what_came_and_says_so(upstream: Upstream) -> None:
    before = sample("bot_upstream_incomplete_total", reason="truncated")
    upstream.llm(cut_after=3)
    client, session = await bot_client(upstream)
    answer, pieces = await collect(client)
    await session.close()
    assert "".join(pieces) == "[1] You asked:"
    assert answer.text == "[1] You asked:" + INCOMPLETE_NOTES["truncated"]
    assert answer.incomplete == "truncated" and not answer.cacheable and answer.upstream_failed
    assert sample("bot_upstream_incomplete_total", reason="truncated") == before + 1


async def test_a_stream_cut_before_any_piece_is_a_failure_to_retry(upstream: Upstream) -> None:
    upstream.llm(cut_after=0)
    client, session = await bot_client(upstream)
    with pytest.raises(UpstreamUnavailable):
        await client.answer("q", [])
    await session.close()


async def test_a_slow_first_token_times_out_but_slow_pieces_after_it_do_not(
    upstream: Upstream,
) -> None:
    before = sample("bot_upstream_requests_total", outcome="timeout")
    upstream.llm(first_token_ms=1500)
    client, session = await bot_client(upstream, first_token_timeout=0.3, total_timeout=5)
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="first token"):
        await client.answer("q", [])
    assert time.monotonic() - started < 1.2
    assert sample("bot_upstream_requests_total", outcome="timeout") == before + 1
    # The first token in time, the whole answer (7 pieces, 0.1 s apart) past the first
    # token's bound but inside the total: a whole answer.
    upstream.llm(token_ms=100)
    answer, _ = await collect(client)
    assert answer.text == "[2] You asked: what is a pulsar?" and answer.cacheable
    await session.close()


async def test_running_out_of_total_time_midway_keeps_what_came(upstream: Upstream) -> None:
    upstream.llm(token_ms=300)
    client, session = await bot_client(upstream, first_token_timeout=0.5, total_timeout=0.8)
    answer, pieces = await collect(client)
    await session.close()
    assert answer.incomplete == "truncated" and 1 <= len(pieces) < 7
    assert answer.text.endswith(INCOMPLETE_NOTES["truncated"])


@pytest.fixture
def wedged_url() -> Iterator[str]:
    """A URL whose port listens but never accepts, its accept queue full: a connect to it
    neither completes nor is refused (the kernel drops the SYN), as with a provider whose
    load balancer is overwhelmed or a firewall that drops packets."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # backlog 0 still queues one or two: fill them
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the premise: a connect here hangs
        probe.connect(("127.0.0.1", port))
    probe.close()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in (*fillers, listener):
            s.close()


async def test_a_connect_that_never_completes_times_out_at_the_connect_bound(
    wedged_url: str,
) -> None:
    """Bounded by `UPSTREAM_CONNECT_TIMEOUT`, not by the first-token or total timeouts."""
    before = sample("bot_upstream_requests_total", outcome="timeout")
    session = aiohttp.ClientSession()
    client = OpenAIClient(
        session,
        wedged_url,
        model="m-1",
        key="",
        connect_timeout=0.3,
        first_token_timeout=5,
        total_timeout=10,
    )
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="timed out"):
        await client.answer("q", [])
    took = time.monotonic() - started
    await session.close()
    assert 0.25 <= took < 1.5, took
    assert sample("bot_upstream_requests_total", outcome="timeout") == before + 1


async def test_an_unreachable_upstream_queues_the_question_within_the_connect_timeout(
    make_app_client: Callable[..., Awaitable[AppClient]], wedged_url: str
) -> None:
    """The replica's whole path: a transient failure, so the job goes to RabbitMQ (202)."""
    client = await make_app_client(
        **{
            **_OPENAI,
            "UPSTREAM_URL": wedged_url,
            "UPSTREAM_CONNECT_TIMEOUT": "0.3",
            "UPSTREAM_FIRST_TOKEN_TIMEOUT": "5",
            "UPSTREAM_TOTAL_TIMEOUT": "10",
        }
    )
    await ready(client)
    before = sample("bot_retry_jobs_published_total")
    started = time.monotonic()
    resp = await ask(client, unique("q"))
    took = time.monotonic() - started
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["status"] == "queued"
    assert took < 1.5, took
    assert sample("bot_retry_jobs_published_total") == before + 1


@pytest.mark.parametrize(
    ("faults", "reason", "text"),
    [
        ({"content_null": True, "refusal": "I can't help with that."}, "content_null",
         "I can't help with that."),
        ({"content_null": True}, "content_null", INCOMPLETE_NOTES["content_null"]),
        ({"empty_choices": True}, "empty_choices", INCOMPLETE_NOTES["empty_choices"]),
        ({"finish_reason": "length"}, "length",
         "[1] You asked: what is a pulsar?" + INCOMPLETE_NOTES["length"]),
    ],
)  # fmt: skip
async def test_answers_that_are_not_whole_have_defined_replies(
    upstream: Upstream, faults: dict[str, Any], reason: str, text: str
) -> None:
    upstream.llm(**faults)
    client, session = await bot_client(upstream)
    answer, _ = await collect(client)
    await session.close()
    assert (answer.text, answer.incomplete, answer.cacheable) == (text, reason, False)
    assert answer.text != "None"


async def test_a_user_model_goes_to_the_upstream_and_to_its_own_metrics(
    upstream: Upstream,
) -> None:
    client, session = await bot_client(upstream)
    before = sample("bot_upstream_tokens_total", kind="completion", model="m-2")
    await collect(client, model="m-2")
    await session.close()
    assert upstream.stats().last["model"] == "m-2"
    assert sample("bot_upstream_tokens_total", kind="completion", model="m-2") == before + 7


# --- the replica in-process ------------------------------------------------------------------


async def ready(client: AppClient) -> None:
    """Wait until the replica has its broker (it connects in the background)."""
    async with asyncio.timeout(10):
        while not (await (await client.get("/readyz")).json())["dependencies"].get("rabbitmq"):
            await asyncio.sleep(0.05)


async def ask(client: AppClient, text: str, user: str = "", **headers: str) -> ClientResponse:
    body = {"user_id": user or unique(), "text": text}
    return await client.post("/v1/messages", json=body, headers=headers)


async def test_a_permanent_error_is_an_apology_now_not_a_retry_nor_a_breaker_trip(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(BOT_BREAKER_CONSECUTIVE="2", **_OPENAI)
    upstream.llm(status=401, code="invalid_api_key", times=3)
    for _ in range(3):
        resp = await ask(client, unique("q"))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["status"] == "replied" and "credentials" in body["reply"]
        assert body["cached"] is False
    assert upstream.stats().calls == 3  # one call each: nothing retried
    # Three failures in a row would have opened a breaker that counts them (2 in a row).
    ok = await ask(client, "still there?")
    assert (await ok.json())["reply"] == "[4] You asked: still there?"


async def test_a_transient_error_queues_the_question(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(**_OPENAI)
    upstream.llm(status=429, headers={"Retry-After": "30"})
    resp = await ask(client, unique("q"))
    assert resp.status == 202 and (await resp.json())["status"] == "queued"
    # The upstream said when to come back: the circuit stays open till then.
    again = await ask(client, unique("q"))
    assert again.status == 202 and upstream.stats().calls == 1


@pytest.mark.parametrize(
    ("status", "headers", "wait"),
    [
        (429, {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1s",
               "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "45s"}, 45),
        (503, {"Retry-After": "20"}, 20),
    ],
)  # fmt: skip
async def test_the_queued_retry_waits_as_long_as_the_upstream_said(
    make_app_client: Callable[..., Awaitable[AppClient]],
    upstream: Upstream,
    status: int,
    headers: dict[str, str],
    wait: float,
) -> None:
    """The job goes to RabbitMQ no sooner than `Retry-After`, or for a 429 without it, the
    reset of the rate-limit budget that ran out."""
    client = await make_app_client(**_OPENAI)
    await ready(client)
    upstream.llm(status=status, headers=headers)
    with capture_logs() as events:
        resp = await ask(client, unique("q"))
    assert resp.status == 202, await resp.text()
    (published,) = [e for e in events if e["event"] == "retry_job_published"]
    assert wait <= published["delay"] < wait * 2, published


async def test_the_breaker_counts_timeouts_not_slowness_below_them(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(
        BOT_BREAKER_CONSECUTIVE="2",
        UPSTREAM_FIRST_TOKEN_TIMEOUT="0.5",
        UPSTREAM_TOTAL_TIMEOUT="3",
        **_OPENAI,
    )
    upstream.llm(first_token_ms=300)  # slow, but in time: three in a row
    for _ in range(3):
        resp = await ask(client, unique("q"))
        assert resp.status == 200 and (await resp.json())["status"] == "replied"
    upstream.llm(first_token_ms=800)  # past the first-token bound: two timeouts open it
    for _ in range(2):
        assert (await ask(client, unique("q"))).status == 202
    assert upstream.stats().calls == 5
    upstream.llm()
    assert (await ask(client, unique("q"))).status == 202  # short-circuited: no call
    assert upstream.stats().calls == 5


@pytest.mark.parametrize(
    "faults",
    [{"content_null": True}, {"empty_choices": True}, {"finish_reason": "length"},
     {"cut_after": 2}],
)  # fmt: skip
async def test_answers_that_are_not_whole_are_never_cached(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream,
    faults: dict[str, Any],
) -> None:  # fmt: skip
    client = await make_app_client(**_OPENAI)
    question = unique("q")
    upstream.llm(times=1, **faults)
    first = await ask(client, question)
    assert first.status == 200 and first.headers["X-Cache"] == "MISS"
    assert (await first.json())["reply"] != f"[1] You asked: {question}"
    second = await ask(client, question)  # another user: would be a hit had it been stored
    assert second.headers["X-Cache"] == "MISS"
    assert (await second.json())["reply"] == f"[2] You asked: {question}"
    third = await ask(client, question)
    assert third.headers["X-Cache"] == "HIT"


async def test_single_flight_waiters_get_the_same_incomplete_answer(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(**_OPENAI)
    upstream.llm(finish_reason="length", token_ms=50)
    question = unique("q")
    replies = await asyncio.gather(*(ask(client, question) for _ in range(5)))
    bodies = [await r.json() for r in replies]
    assert upstream.stats().calls == 1
    assert {b["reply"] for b in bodies} == {
        f"[1] You asked: {question}" + INCOMPLETE_NOTES["length"]
    }


@pytest.mark.parametrize(
    ("faults", "reply"),
    [
        ({"finish_reason": "length"}, "[1] You asked: {q}" + INCOMPLETE_NOTES["length"]),
        ({"status": 404, "code": "model_not_found"}, "not available"),
    ],
)
async def test_waiters_on_another_replica_get_the_same_uncached_reply_from_one_call(
    make_app_client: Callable[..., Awaitable[AppClient]],
    upstream: Upstream,
    faults: dict[str, Any],
    reply: str,
) -> None:
    """Two replicas (two apps, one Redis): the second waits on the first's call through the
    cache's single-flight lock, and gets its incomplete answer or its refusal, not a call."""
    first = await make_app_client(**_OPENAI)
    second = await make_app_client(**_OPENAI)
    upstream.faults(latency_ms=300)  # the leader's call is under way while the others ask
    upstream.llm(**faults)
    question = unique("q")
    leader = asyncio.ensure_future(ask(first, question))
    while upstream.stats().calls == 0:
        await asyncio.sleep(0.01)
    waiters = await asyncio.gather(*(ask(second, question) for _ in range(3)))
    replies = [(await r.json())["reply"] for r in [await leader, *waiters]]
    assert upstream.stats().calls == 1
    assert len(set(replies)) == 1 and reply.format(q=question) in replies[0]


async def stream_events(
    client: AppClient, question: str
) -> list[tuple[float, str, dict[str, Any]]]:
    """A streamed ask's events as they arrive: (when, name, data)."""
    events: list[tuple[float, str, dict[str, Any]]] = []
    resp = await ask(client, question, Accept="text/event-stream")
    assert resp.status == 200, await resp.text()
    name = ""
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((time.monotonic(), name, orjson.loads(line[6:])))
    return events


async def test_streaming_waiters_on_two_replicas_get_the_deltas_of_one_call(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    """The leader streams on one replica; a second asker there and one on another replica
    (two apps, one Redis) join while it streams: one upstream call, and each of them sees
    the answer grow (deltas over time, adding up to it) and then the same final body."""
    first = await make_app_client(**_OPENAI)
    second = await make_app_client(**_OPENAI)
    upstream.llm(token_ms=150)
    question = unique("q") + " please name five stars"  # 8 pieces over about 1 s
    leader = asyncio.ensure_future(stream_events(first, question))
    while upstream.stats().calls == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # a piece or two have gone out
    here, there = await asyncio.gather(
        stream_events(first, question), stream_events(second, question)
    )
    streams = [await leader, here, there]
    assert upstream.stats().calls == 1
    reply = f"[1] You asked: {question}"
    for events in streams:
        names = [name for _, name, _ in events]
        assert names[-1] == "done" and set(names[:-1]) == {"delta"}, names
        deltas = [(at, data["text"]) for at, name, data in events if name == "delta"]
        assert len(deltas) >= 3, deltas  # several, not the whole answer at once
        assert "".join(text for _, text in deltas) == reply
        assert events[-1][0] - deltas[0][0] >= 0.3, events  # it grew before it ended
        done = events[-1][2]
        assert (done["status"], done["reply"], done["cached"]) == ("replied", reply, False)
    # The cache keeps the final answer: the next asker gets it whole, with no deltas.
    assert [name for _, name, _ in await stream_events(second, question)] == ["done"]


async def test_the_model_pref_is_limited_to_the_allow_list(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(UPSTREAM_MODELS="m-big,m-small", **_OPENAI)
    user = unique()
    refused = await ask(client, "/prefs set model gpt-secret", user)
    assert refused.status == 400
    assert "stub-model, m-big, m-small" in (await refused.json())["error"]["message"]
    put = await client.put(f"/v1/users/{user}/prefs", json={"prefs": {"model": "nope"}})
    assert put.status == 400
    assert (await ask(client, "/prefs set model m-big", user)).status == 200
    await ask(client, unique("q"), user)
    assert upstream.stats().last["model"] == "m-big"
    await ask(client, unique("q"))  # another user: the configured model
    assert upstream.stats().last["model"] == "stub-model"


async def test_without_an_allow_list_the_model_pref_is_ignored(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(**_OPENAI)
    user = unique()
    assert (await ask(client, "/prefs set model anything", user)).status == 200
    await ask(client, unique("q"), user)
    assert upstream.stats().last["model"] == "stub-model"


async def test_a_streamed_answer_is_deltas_then_the_json_body(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(**_OPENAI)
    question = unique("q")
    resp = await ask(client, question, Accept="text/event-stream")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no" and resp.headers["X-Request-ID"]
    events = parse_events(await resp.text())
    deltas = [data["text"] for name, data in events if name == "delta"]
    assert len(deltas) == 4 and [name for name, _ in events][-1] == "done"
    done = events[-1][1]
    assert done == {
        "message_id": resp.headers["X-Request-ID"],
        "status": "replied",
        "reply": "".join(deltas),
        "cached": False,
    }
    # The cache keeps the final answer only: another user's ask is a hit, one `done` event.
    hit = await ask(client, question, Accept="text/event-stream")
    assert hit.headers["X-Cache"] == "HIT"
    events = parse_events(await hit.text())
    assert events == [("done", {**done, "message_id": hit.headers["X-Request-ID"], "cached": True})]


async def test_a_streamed_ask_that_queues_or_fails_validation(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    client = await make_app_client(**_OPENAI)
    bad = await client.post(
        "/v1/messages", json={"user_id": "u", "text": ""}, headers={"Accept": "text/event-stream"}
    )
    assert bad.status == 400 and bad.content_type == "application/json"
    upstream.llm(status=503)
    queued = await ask(client, unique("q"), Accept="text/event-stream")
    events = parse_events(await queued.text())
    assert [name for name, _ in events] == ["done"] and events[0][1]["status"] == "queued"
    # A stream cut midway: the deltas that came, then the reply that says so.
    upstream.llm(cut_after=2)
    cut = parse_events(await (await ask(client, unique("q"), Accept="text/event-stream")).text())
    assert [name for name, _ in cut] == ["delta", "delta", "done"], cut
    assert cut[-1][1]["reply"].endswith(INCOMPLETE_NOTES["truncated"])


# --- through NGINX ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm_stack() -> Iterator[Stack]:
    """One private stack whose replicas ask the stub as an LLM (its own Redis DB)."""
    owner = f"llm-{uuid.uuid4().hex[:8]}"
    db = claim_redis_db(owner)
    try:
        with stack_dir() as base:
            stack = Stack(base / "run", stack_env(db, BOT_REPLICAS="2", **_OPENAI))
            stack.start()
            try:
                yield stack
            finally:
                stack.stop()
    finally:
        release_redis_db(db, owner)


@pytest.mark.system
def test_a_streamed_answer_reaches_the_client_through_nginx_as_it_grows(
    llm_stack: Stack,
) -> None:
    """NGINX passes each event on as it comes (no buffering of the stream)."""
    stack = llm_stack
    requests.post(stack.stub_url + "/admin/llm", json={"token_ms": 300}, timeout=5)
    question = "name five stars please"  # 7 pieces, 0.3 s apart
    started = time.monotonic()
    seen: list[tuple[float, str]] = []
    with requests.post(
        stack.url + "/v1/messages",
        json={"user_id": unique(), "text": question},
        headers={"Accept": "text/event-stream"},
        stream=True,
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        for line in resp.iter_lines(chunk_size=1):
            if line.startswith(b"event: "):
                seen.append((time.monotonic() - started, line[7:].decode()))
    names = [name for _, name in seen]
    assert names == ["delta"] * 7 + ["done"], names
    first, last = seen[0][0], seen[-1][0]
    assert last - first >= 1.5, seen  # 6 gaps of 0.3 s: the deltas came one by one
    assert first < last / 3, seen
    # As docs/openapi.yaml says it answers.
    spec = {**yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())}
    api = OpenAPI.from_dict({**spec, "servers": [{"url": stack.url}]})
    req = requests.Request(
        "POST",
        stack.url + "/v1/messages",
        json={"user_id": unique(), "text": question},
        headers={"Accept": "text/event-stream"},
    )
    resp = requests.Session().send(req.prepare(), timeout=30)
    api.validate_response(RequestsOpenAPIRequest(req), RequestsOpenAPIResponse(resp))
    assert resp.text.startswith("event: done\n")  # a cache hit: the final answer only
    requests.post(stack.stub_url + "/admin/llm", json={}, timeout=5)


@pytest.mark.system
def test_the_stream_load_test_measures_first_and_last_byte(llm_stack: Stack) -> None:
    """`python -m loadtests.stream`, briefly: every answer whole, its moments in order."""
    summary = stream_load.run(llm_stack.url, 4, 4, 40, llm_stack.stub_url)
    assert summary["failed"] == 0 and summary["answers"] >= 4, summary
    first, delta, last = (summary[m]["p50"] for m in stream_load.MOMENTS)
    # 9 pieces 40 ms apart: the whole answer comes at least 0.3 s after its first words.
    assert first <= delta < last and last - delta >= 300, summary
    assert "sooner than the whole answer" in stream_load.render(summary, 4)


# --- settings ----------------------------------------------------------------------------------


def test_llm_settings_parse_and_refuse_bad_values(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are terse.\nAnswer in English.\n")
    s = load_settings(
        {
            "UPSTREAM_KIND": "openai",
            "UPSTREAM_MODELS": "gpt-4o, gpt-4o-mini,gpt-4o",
            "UPSTREAM_SYSTEM_PROMPT_FILE": str(prompt),
            "UPSTREAM_TEMPERATURE": "",
            "UPSTREAM_PRICES": "gpt-4o=2.5/10,gpt-4o-mini=0.15/0.6",
            "UPSTREAM_DAILY_BUDGET": "25",
        },
        dotenv=Path("/dev/null"),
    )
    assert s.upstream_models == ("gpt-4o", "gpt-4o-mini")
    assert s.upstream_system_prompt == "You are terse.\nAnswer in English."
    assert s.upstream_temperature is None and s.upstream_max_tokens == 1024
    assert s.upstream_prices == (("gpt-4o", 2.5, 10.0), ("gpt-4o-mini", 0.15, 0.6))
    assert (s.upstream_connect_timeout, s.upstream_first_token_timeout) == (3.0, 20.0)
    # An LLM's whole answer bounds the claim and the single-flight lock, not the stub's 2 s.
    assert s.call_timeout == 90.0 and s.lease_ms == 185_000
    assert load_settings({}, dotenv=Path("/dev/null")).call_timeout == 2.0
    for name, value in [
        ("UPSTREAM_TEMPERATURE", "3"),
        ("UPSTREAM_PRICES", "gpt-4o=cheap"),
        ("UPSTREAM_MODELS", "bad model"),
        ("UPSTREAM_MAX_TOKENS", "0"),
        ("UPSTREAM_FIRST_TOKEN_TIMEOUT", "200"),  # longer than the total's 90
    ]:
        with pytest.raises(SettingsError) as raised:
            load_settings({name: value}, dotenv=Path("/dev/null"))
        assert raised.value.name == name
