"""Unit tests: pure logic (commands, validation, settings, GCRA arithmetic)."""

from __future__ import annotations

import sys
import unicodedata
from pathlib import Path

import pytest

from bot.core.commands import Command, parse
from bot.core.validation import FORBIDDEN_RE, parse_message
from bot.errors import BadRequest, RateLimited
from bot.ratelimit import LocalLimiter, Policy
from bot.settings import Rate, SettingsError, load_settings, parse_rate
from infra import common


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/help", Command("help")),
        ("/echo  hi there", Command("echo", ("hi there",))),
        ("/prefs", Command("prefs")),
        ("/prefs get lang", Command("prefs_get", ("lang",))),
        ("/prefs set lang en gb", Command("prefs_set", ("lang", "en gb"))),
        ("/prefs set lang", Command("prefs_set", ("lang", ""))),
        ("/prefs del lang", Command("prefs_del", ("lang",))),
        ("/prefs frobnicate", Command("prefs_usage")),
        ("/ask what is a pulsar?", Command("ask", ("what is a pulsar?",))),
        ("what is a pulsar?", Command("ask", ("what is a pulsar?",))),
        ("/unknown thing", Command("ask", ("/unknown thing",))),
    ],
)
def test_commands_parse(text: str, expected: Command) -> None:
    assert parse(text) == expected


def test_message_trims_text_and_falls_back_to_request_id() -> None:
    msg = parse_message({"user_id": "u-1", "text": "  hi  "}, "req-1")
    assert (msg.text, msg.message_id, msg.explicit_id) == ("hi", "req-1", False)
    msg = parse_message({"user_id": "u-1", "text": "hi", "message_id": "m:1"}, "req-1")
    assert (msg.message_id, msg.explicit_id) == ("m:1", True)


@pytest.mark.parametrize(
    "payload",
    [
        [],
        {"text": "hi"},
        {"user_id": "u1"},
        {"user_id": "", "text": "hi"},
        {"user_id": "u 1", "text": "hi"},
        {"user_id": "u" * 129, "text": "hi"},
        {"user_id": 5, "text": "hi"},
        {"user_id": "u1", "text": "   "},
        {"user_id": "u1", "text": "x" * 4097},
        {"user_id": "u1", "text": None},
        {"user_id": "u1", "text": "a\x00b"},
        {"user_id": "u1", "text": "hi", "message_id": "bad id"},
        {"user_id": "u1", "text": "hi", "extra": 1},
    ],
)
def test_bad_messages_are_rejected(payload: object) -> None:
    with pytest.raises(BadRequest):
        parse_message(payload, "req")


def test_the_control_character_pattern_is_the_unicode_rule_over_every_code_point() -> None:
    """One precompiled pattern stands for "category Cc but tab, newline and carriage return,
    and every (lone) surrogate": the same code points as unicodedata's, all 1 114 112 of them,
    and the validation refuses each of those and nothing else."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    category = unicodedata.category
    expected = {
        i
        for i, ch in enumerate(every)
        if (c := category(ch)) == "Cs" or (c == "Cc" and ch not in "\t\n\r")
    }
    assert {m.start() for m in FORBIDDEN_RE.finditer(every)} == expected
    assert len(expected) == 65 - 3 + 2048
    for cp in [*expected, 0x09, 0x0A, 0x0D, 0x20, 0x7E, 0xA0, 0x2028, 0xFEFF, 0x10FFFF]:
        text = f"a{chr(cp)}b"
        if cp in expected:
            with pytest.raises(BadRequest):
                parse_message({"user_id": "u", "text": text}, "r")
        else:
            assert parse_message({"user_id": "u", "text": text}, "r").text == text


def test_text_limit_counts_after_trimming() -> None:
    assert parse_message({"user_id": "u", "text": " " + "x" * 4096 + " "}, "r").text == "x" * 4096


def test_rate_parsing() -> None:
    assert parse_rate("30/minute") == Rate(30, 60.0)
    assert parse_rate("5/second").interval == 0.2
    for bad in ("30", "0/minute", "3/day", "x/minute"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_settings_defaults_match_the_contract() -> None:
    s = load_settings({}, dotenv=None)
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.upstream_url == "http://127.0.0.1:8099"
    assert (s.replicas, s.rate_limit, s.rate_burst, s.api_keys) == (3, Rate(30, 60.0), 10, ())
    assert (s.cache_ttl, s.upstream_timeout, s.retry_max_attempts) == (300, 2.0, 8)
    assert (s.log_format, s.public_port, s.port_base, s.metrics_port_base) == (
        "json",
        8080,
        8001,
        9101,
    )
    assert s.worker_metrics_port == 9200


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("BOT_REPLICAS", "0"),
        ("BOT_RATE_LIMIT", "lots"),
        ("BOT_UPSTREAM_TIMEOUT", "-1"),
        ("LOG_FORMAT", "xml"),
        ("REDIS_URL", "http://x"),
        ("BOT_PUBLIC_PORT", "99999"),
    ],
)
def test_bad_setting_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({var: value})
    assert var in str(err.value)


def test_settings_environment_beats_dotenv(tmp_path: pytest.TempPathFactory) -> None:
    env_file = tmp_path / ".env"  # type: ignore[operator]
    env_file.write_text("BOT_REPLICAS=5\nBOT_RATE_BURST='4'\n")
    s = load_settings({"BOT_REPLICAS": "2"}, dotenv=env_file)
    assert (s.replicas, s.rate_burst) == (2, 4)


def test_local_gcra_allows_burst_then_sustained_rate() -> None:
    limiter = LocalLimiter(Policy(Rate(60, 60.0), burst=4))
    allowed = [limiter.check("u", now=100.0).retry_after_s == 0 for _ in range(7)]
    assert allowed == [True] * 5 + [False] * 2
    denied = limiter.check("u", now=100.0)
    assert denied.retry_after_s == pytest.approx(1.0)
    assert limiter.check("u", now=100.0 + denied.retry_after_s).retry_after_s == 0
    assert limiter.check("other", now=100.0).remaining == 4


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    assert RateLimited("x", 0.01).retry_after == 1
    assert RateLimited("x", 1.2).retry_after == 2
    assert RateLimited("x", 3.0).retry_after == 3


def test_port_blocks_are_leased_apart_and_outside_the_ephemeral_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every block handed out within the lease is a different one (a second chooser never gets
    a block whose stack has not bound it yet), none overlaps the kernel's ephemeral ports, and
    when all are leased the next caller is told so instead of sharing one."""
    monkeypatch.setattr(common, "_LEASES", tmp_path / "leases.json")
    low, high = (int(p) for p in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    bases: list[int] = []
    with pytest.raises(RuntimeError, match="no free port block"):
        for _ in common._block_slots():  # one more call than there can be free blocks
            bases.append(common.free_port_block())
        common.free_port_block()
    assert len(set(bases)) == len(bases) > 10
    for base in bases:
        assert base + common.BLOCK_SIZE <= low or base > high
