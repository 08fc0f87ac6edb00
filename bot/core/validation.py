"""Validation of incoming messages and preferences (contract.md limits)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.errors import BadRequest

ID_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
PREF_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TEXT = 4096
MAX_PREF_VALUE = 1024
_FIELDS = {"user_id", "text", "message_id"}
# Unicode category Cc except tab, newline and carriage return, and every surrogate (a decoded
# string holds one only when it is lone). One precompiled pattern, not a per-character
# unicodedata loop; tests/test_unit.py proves it the same rule over every code point.
FORBIDDEN_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Message:
    user_id: str
    text: str
    message_id: str
    explicit_id: bool  # False when the id came from X-Request-ID or was generated


def check_id(value: Any, field: str) -> str:
    """A user or message id: 1-128 chars of ``[A-Za-z0-9_.:@-]``."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", code=f"invalid_{field}")
    if not ID_RE.fullmatch(value):
        raise BadRequest(
            f"{field} must be 1-128 characters of A-Z a-z 0-9 _ . : @ -", code=f"invalid_{field}"
        )
    return value


def _clean_text(value: Any) -> str:
    """The trimmed text: 1-4096 characters, no control characters anywhere.

    docs/openapi.yaml states the same rule as one pattern (`MessageIn.text`). Control
    characters are looked for in the whole value, before trimming: ``str.strip`` counts some
    of them (U+001C-U+001F, U+0085) as whitespace and would let them through at either end.
    """
    if not isinstance(value, str):
        raise BadRequest("text must be a string", code="invalid_text")
    # They have no place in a chat message and break downstream JSON encoders.
    if FORBIDDEN_RE.search(value):
        raise BadRequest("text contains control characters", code="invalid_text")
    text = value.strip()
    if not text:
        raise BadRequest("text must not be empty", code="invalid_text")
    if len(text) > MAX_TEXT:
        raise BadRequest(f"text must be at most {MAX_TEXT} characters", code="invalid_text")
    return text


def parse_message(payload: Any, fallback_id: str) -> Message:
    """Turn a decoded JSON body into a `Message`, or raise `BadRequest`."""
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object", code="invalid_body")
    unknown = set(payload) - _FIELDS
    if unknown:
        raise BadRequest(f"unknown field: {sorted(unknown)[0]}", code="unknown_field")
    if "user_id" not in payload:
        raise BadRequest("user_id is required", code="invalid_user_id")
    if "text" not in payload:
        raise BadRequest("text is required", code="invalid_text")
    user_id = check_id(payload["user_id"], "user_id")
    text = _clean_text(payload["text"])
    if "message_id" in payload and payload["message_id"] is not None:
        return Message(user_id, text, check_id(payload["message_id"], "message_id"), True)
    return Message(user_id, text, fallback_id, False)


def check_pref_key(key: Any) -> str:
    if not isinstance(key, str) or not PREF_KEY_RE.fullmatch(key):
        raise BadRequest(
            "preference keys are 1-64 characters of A-Z a-z 0-9 _ . -", code="invalid_pref_key"
        )
    return key


def check_pref_value(value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest("preference values must be strings", code="invalid_pref_value")
    if len(value) > MAX_PREF_VALUE:
        raise BadRequest(
            f"preference values are at most {MAX_PREF_VALUE} characters",
            code="invalid_pref_value",
        )
    return value
