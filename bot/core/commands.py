"""Parsing of chat commands in a message's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

HELP = (
    "Commands: /help; /echo <text>; /prefs (all), /prefs get <key>, /prefs set <key> <value>, "
    "/prefs del <key>; /ask <question> or just ask."
)


CommandName = Literal[
    "help", "echo", "prefs", "prefs_get", "prefs_set", "prefs_del", "prefs_usage", "ask"
]


@dataclass(frozen=True, slots=True)
class Command:
    name: CommandName
    args: tuple[str, ...] = ()


def parse(text: str) -> Command:
    """Split ``/cmd args`` into a `Command`; anything that is not a known command is a question."""
    if not text.startswith("/"):
        return Command("ask", (text,))
    head, _, rest = text.partition(" ")
    rest = rest.strip()
    match head.lower():
        case "/help":
            return Command("help")
        case "/echo":
            return Command("echo", (rest,))
        case "/ask":
            return Command("ask", (rest,)) if rest else Command("help")
        case "/prefs":
            return _prefs(rest)
    return Command("ask", (text,))


def _prefs(rest: str) -> Command:
    if not rest:
        return Command("prefs")
    sub, _, tail = rest.partition(" ")
    tail = tail.strip()
    match sub.lower():
        case "get":
            return Command("prefs_get", (tail,))
        case "del":
            return Command("prefs_del", (tail,))
        case "set":
            key, _, value = tail.partition(" ")
            return Command("prefs_set", (key, value.strip()))
    return Command("prefs_usage")
