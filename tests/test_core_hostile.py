"""The core under hostile use and failure, through NGINX: duplicate floods, answers that must
not cross users, a full Redis, and a replica killed mid-question."""

from __future__ import annotations

import pytest

from tests.support import Stack, post, unique

pytestmark = pytest.mark.system


def _say(stack: Stack, user: str, text: str) -> dict[str, object]:
    r = post(stack.url + "/v1/messages", {"user_id": user, "text": text})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_one_users_conversation_never_reaches_another_users_answer(stack: Stack) -> None:
    question = f"what is {unique('pulsar')}?"
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    _say(stack, alice, f"/echo my secret is {unique('s')}")  # now in Alice's context
    hers = _say(stack, alice, question)
    assert "(context " in str(hers["reply"])  # the stub saw her conversation
    # Bob, with no conversation, must not get the answer computed with Alice's
    his = _say(stack, bob, question)
    assert "(context " not in str(his["reply"]) and his["cached"] is False
    # and nobody can plant an answer for others by asking inside a conversation
    _say(stack, carol, "/echo hello")
    _say(stack, carol, question)
    again = _say(stack, unique("dave"), question)
    assert again["reply"] == his["reply"] and again["cached"] is True
