"""The simulator's tokenizer: one documented rule, so usage always agrees with the text.

The rule:

- A token is a run of 1 to 6 word characters (letters, digits, `_`; a longer word is split
  every 6 characters), or any single character that is neither a word character nor
  whitespace. Whitespace is free.
- A prompt costs, per message, 4 tokens of framing (start, role, separator, end) plus its
  content (and 1 more if the message has a `name`), and 3 tokens more in all, which open the
  assistant's reply. Only text content counts; other content parts (images, audio) are free.

So `count_tokens("Hello, world!") == 4` and one user message "Hello, world!" costs
4 + 4 + 3 = 11 prompt tokens. English text comes out at 4 to 5 characters a token, near real
tokenizers.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

__all__ = [
    "MESSAGE_TOKENS",
    "WORD_CHARS_PER_TOKEN",
    "REPLY_TOKENS",
    "TOKEN_PATTERN",
    "count_prompt_tokens",
    "count_tokens",
    "message_text",
    "prompt_token_stream",
    "truncate_tokens",
]

WORD_CHARS_PER_TOKEN = 6
TOKEN_PATTERN = re.compile(rf"\w{{1,{WORD_CHARS_PER_TOKEN}}}|[^\w\s]")
MESSAGE_TOKENS = 4
REPLY_TOKENS = 3

_findall = TOKEN_PATTERN.findall


def count_tokens(text: str) -> int:
    """Count the tokens of `text` by the simulator's rule (see the module docstring).

    >>> count_tokens("Hello, world!")
    4
    """
    return len(_findall(text))


def truncate_tokens(text: str, limit: int) -> str:
    """Return the longest prefix of `text` that holds `limit` tokens (all of it if shorter)."""
    if limit <= 0:
        return ""
    for number, match in enumerate(TOKEN_PATTERN.finditer(text), start=1):
        if number == limit:
            return text[: match.end()]
    return text


def message_text(message: Mapping[str, Any]) -> str:
    """The text of a message's content: the string, or its text parts joined by newlines."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def count_prompt_tokens(messages: Iterable[Mapping[str, Any]]) -> int:
    """Count the prompt tokens of a list of chat messages by the simulator's rule."""
    total = REPLY_TOKENS
    for message in messages:
        total += MESSAGE_TOKENS + len(_findall(message_text(message)))
        if "name" in message:
            total += 1 + len(_findall(str(message["name"])))
    return total


def prompt_token_stream(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The prompt as its sequence of tokens, framing included: `count_prompt_tokens` of them.

    Prompt caching hashes prefixes of this sequence.
    """
    tokens: list[str] = []
    for message in messages:
        tokens += ("<|start|>", str(message.get("role")), "<|message|>")
        if "name" in message:
            tokens.append("<|name|>")
            tokens += _findall(str(message["name"]))
        tokens += _findall(message_text(message))
        tokens.append("<|end|>")
    tokens += ("<|start|>", "assistant", "<|message|>")
    return tokens
