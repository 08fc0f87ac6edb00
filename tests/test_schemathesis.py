"""docs/openapi.yaml and the running stack agree on what a valid request is."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.core.validation import MAX_TEXT, parse_message
from bot.errors import BadRequest
from tests.support import Stack, post, unique

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "openapi.yaml"


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(DOC.read_text())
    return spec


def _text_pattern() -> re.Pattern[str]:
    pattern: str = _spec()["components"]["schemas"]["MessageIn"]["properties"]["text"]["pattern"]
    return re.compile(pattern)


def _server_accepts(text: str) -> bool:
    try:
        parse_message({"user_id": "u", "text": text}, "r")
    except BadRequest:
        return False
    return True


# Every character class the text rule cares about: controls (C0, DEL, C1, the ones str.strip
# counts as whitespace), every whitespace character, near-misses (zero-width space, BOM),
# ordinary and astral characters.
_POOL = [chr(c) for c in range(0x00, 0xA2)] + [
    chr(c)
    for c in (
        *range(0x2000, 0x200D),
        0x1680,
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
        0xFEFF,
        0xE9,
        0x4E2D,
        0x1F600,
    )
]


@pytest.mark.parametrize(
    "text",
    [
        "hi",
        "  hi\t\n",
        "\u3000hi\u00a0",
        "hi\x1f",  # str.strip() takes U+001F for whitespace: refused anyway
        "\x85hi",
        "a\x00b",
        "a\x7fb",
        " \n\r\t ",
        "x" * MAX_TEXT,
        " " + "x" * MAX_TEXT + "\n",
        "x" * (MAX_TEXT + 1),
        "\u200b",
        "\ufeff",
    ],
)
def test_text_rule_is_the_documented_pattern(text: str) -> None:
    assert (_text_pattern().search(text) is not None) == _server_accepts(text)


def test_text_rule_is_the_documented_pattern_on_random_strings() -> None:
    pattern = _text_pattern()
    rng = random.Random(15)
    for _ in range(20_000):
        text = "".join(rng.choice(_POOL) for _ in range(rng.randint(0, 5)))
        assert (pattern.search(text) is not None) == _server_accepts(text), repr(text)


@pytest.mark.system
@pytest.mark.parametrize("text", ["hi\x1f", "\x85hi", "\x1chi\x1d"])
def test_control_characters_at_either_end_are_refused(stack: Stack, text: str) -> None:
    """str.strip() counts these as whitespace; they were trimmed away and the text accepted."""
    r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": text})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_text"
