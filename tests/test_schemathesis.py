"""docs/openapi.yaml and the running stack agree, as schemathesis judges it.

Schemathesis generates requests from the document, valid ones and invalid ones (negative
mode) and methods the document does not declare, sends them through NGINX and runs every one
of its checks on the answers: no 5xx, only documented status codes, content types, headers and
bodies, schema-valid requests accepted, schema-invalid ones rejected, `405` with `Allow`.
Where they disagreed, either the server or the document was fixed; this keeps them agreeing.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from bot.core.validation import MAX_TEXT, parse_message
from bot.errors import BadRequest
from bot.inbox import valid_cursor
from tests.support import Stack, post, run, unique

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "openapi.yaml"
# The venv running the tests has the CLI beside its python.
ST = Path(sys.executable).parent / "st"
HOOKS = Path(__file__).resolve().parent / "schemathesis_hooks.py"
# Enough for the coverage phase (every boundary and invalid value of every parameter, every
# undeclared method) plus a fuzzing sample per operation, within about a minute on this box.
MAX_EXAMPLES = 80
SEED = 1511


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


def test_cursor_rule_is_the_documented_pattern() -> None:
    pattern = re.compile(_spec()["components"]["schemas"]["Cursor"]["pattern"])
    top = 2**64 - 1
    rng = random.Random(15)
    cursors = ["0", "00", "1", "", "0-0", "1-2-3", "a-b", "\u0661-\u0661", f"{top}-{top}"]
    cursors += [f"{top + 1}-0", f"0-{top + 1}", "0" * 20 + "-1", "0" * 21 + "-1"]
    for _ in range(20_000):
        # short ids, ids near and just past 2**64-1, some with leading zeros
        a, b = (rng.choice([rng.randrange(10**19), top - rng.randrange(-99, 99)]) for _ in "ab")
        cursors.append(f"{'0' * rng.randrange(3)}{a}-{b}")
    for cursor in cursors:
        assert (pattern.search(cursor) is not None) == valid_cursor(cursor), cursor


@pytest.mark.system
@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("wait=0.30000000000000004", 200),  # a valid number in range: it was a 400
        ("wait=", 200),  # allowEmptyValue: the same as no wait
        ("after=&limit=", 200),
        ("wait=0&wait=abc", 400),  # the first value was read, the rest ignored: a 200
        ("wait=&wait=abc", 400),
        ("after=0&after=x", 400),
        ("limit=5&limit=500", 400),
    ],
)
def test_replies_parameters_answer_as_documented(stack: Stack, query: str, status: int) -> None:
    r = requests.get(f"{stack.url}/v1/users/{unique()}/replies?{query}", timeout=10)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["code"] == "invalid_query"


def _schemathesis(url: str, cwd: Path, max_examples: int, *extra: str) -> str:
    """Run `st run` on the document against `url` with every check; its summary."""
    args = [
        str(ST),
        "run",
        str(DOC),
        "--url",
        url,
        "--checks",
        "all",
        "--mode",
        "all",
        "--max-examples",
        str(max_examples),
        "--seed",
        os.environ.get("SCHEMATHESIS_SEED", str(SEED)),
        # One worker: with several, Hypothesis' lambda introspection races and the run ends
        # in a "Runtime Error" that is the tool's, not the API's.
        "--workers",
        "1",
        "--request-timeout",
        "40",
        "--generation-database",
        "none",
        "--continue-on-failure",
        "--no-color",
        *extra,
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    result = run(args, cwd=cwd, env=env, timeout=280)
    summary = result.stdout[result.stdout.rfind("\n", 0, result.stdout.rfind(" SUMMARY ")) + 1 :]
    print(summary)
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-2_000:]
    operations = sum(len(set(item) - {"parameters"}) for item in _spec()["paths"].values())
    assert re.search(rf"Tested: {operations}\b", result.stdout), summary
    return summary


@pytest.mark.system
@pytest.mark.timeout(300)
def test_schemathesis_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    """All checks, positive and negative data, undeclared methods: zero failures."""
    _schemathesis(stack.url, tmp_path, MAX_EXAMPLES)


@pytest.mark.system
@pytest.mark.timeout(300)
def test_schemathesis_finds_nothing_with_api_keys(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """The same with `BOT_API_KEYS` set and the key sent: auth changes no answer's shape."""
    key = f"key-{unique()}"
    stack = make_stack(BOT_API_KEYS=key, BOT_REPLICAS="1")
    auth = f"Authorization: Bearer {key}"
    _schemathesis(stack.url, tmp_path, MAX_EXAMPLES // 4, "--header", auth)
