"""The cacheable prefix of a request: its key, its length, and the cache it would meet.

Gateways cache prompt prefixes the way OpenAI does: a prompt of at least 1,024 tokens has its
prefix cached in steps of 128 tokens (1,024, 1,152, 1,280, ...), once a request carrying it has
been answered; a later prompt that starts with a cached prefix is billed the longest such
prefix at the cached-input price. Rows whose requests share their leading 1,024 tokens can
share a cached prefix: `prefix_key` names that group, so that `--order prefix` can send a
group's rows together, and `estimate` can say what the cache would save.

Tokens are the run's estimate (inputs/requests.py): each message costs `MESSAGE_TOKENS` of
framing, then one token per `CHARS_PER_TOKEN` characters of its content; the prompt adds
`REPLY_TOKENS`. The prefix is the model, then the messages in order (role, then content), cut
after the first `PREFIX_TOKENS` estimated tokens. Nothing else of the body (tools,
response_format, sampling parameters) is in the key.

Pure and cheap: one hash of at most 4 KB per row, no string bigger than one message's leading
characters; it runs over every row of a 10,000,000-row input.

    >>> prefix_key({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}) is None
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from batchrunner.inputs.requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS

__all__ = [
    "PREFIX_TOKENS",
    "STEP_TOKENS",
    "PrefixCache",
    "cacheable_tokens",
    "prefix_digests",
    "prefix_key",
    "prompt_tokens",
]

#: The shortest prompt a gateway caches, and the length of the prefix `prefix_key` hashes.
PREFIX_TOKENS = 1024
#: A cached prefix grows in steps of this many tokens beyond PREFIX_TOKENS.
STEP_TOKENS = 128

_SEP = b"\x00"
_END = b"\x01"  # ends a message: "ab" + "c" and "a" + "bc" hash apart
_REPLY = b"\x02"  # the framing that opens the reply, after the last message


def _hasher(model: object) -> Any:
    # SHA-1 for speed, not secrecy: with the CPU's SHA instructions it hashes a 4 KB prefix in
    # 3.6 us where blake2b takes 7.4 us (timeit, this machine); the first 8 bytes are the key.
    return hashlib.sha1(str(model).encode() if model is not None else b"", usedforsecurity=False)


def _text(content: Any) -> tuple[str, bytes]:
    """A message's text (what its tokens are reckoned on), and what else identifies it.

    A string content is its own text. A list of parts counts its text parts' characters, as the
    estimate does; its other parts (images, audio) count no tokens but are in the hash.
    """
    if type(content) is str:
        return content, b""
    if isinstance(content, list):
        texts = []
        others = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                others.append(part)
        extra = orjson.dumps(others, option=orjson.OPT_SORT_KEYS, default=str) if others else b""
        return "".join(texts), extra
    if content is None:
        return "", b""
    return "", orjson.dumps(content, option=orjson.OPT_SORT_KEYS, default=str)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The estimated prompt tokens of a request body (the rule of `batchrunner estimate`).

    >>> prompt_tokens({"messages": [{"role": "user", "content": "x" * 400}]})
    107
    """
    messages = body.get("messages") or ()
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if type(content) is str:
            chars += len(content)
        elif content is not None:
            chars += len(_text(content)[0])
    return int(chars / CHARS_PER_TOKEN) + MESSAGE_TOKENS * len(messages) + REPLY_TOKENS


def cacheable_tokens(body: Mapping[str, Any]) -> int:
    """The most prompt tokens of this request a gateway can bill as cached (0: none).

    1,024 and then whole steps of 128 tokens, up to the estimated prompt length; 0 for a prompt
    shorter than 1,024 estimated tokens.

    >>> cacheable_tokens({"messages": [{"role": "user", "content": "x" * 4400}]})
    1024
    """
    return _cacheable(prompt_tokens(body))


def _cacheable(tokens: int) -> int:
    if tokens < PREFIX_TOKENS:
        return 0
    return PREFIX_TOKENS + (tokens - PREFIX_TOKENS) // STEP_TOKENS * STEP_TOKENS


def prefix_key(body: Mapping[str, Any]) -> int | None:
    """A 64-bit hash (a signed int64) of the request's cacheable prefix, or None.

    The prefix is the model and the leading `PREFIX_TOKENS` estimated tokens of the messages.
    None where the prompt is shorter than that (a gateway would not cache it), or the body has
    no messages. Rows with the same key share at least their first 1,024 tokens.
    """
    messages = body.get("messages")
    if not messages:
        return None
    digest = _hasher(body.get("model"))
    update = digest.update
    budget = float(PREFIX_TOKENS)  # tokens still to take
    for message in messages:
        if type(message) is not dict:
            message = message if isinstance(message, Mapping) else {}
        role = message.get("role")
        update(_SEP + (role.encode() if type(role) is str else str(role).encode()))
        budget -= MESSAGE_TOKENS
        if budget <= 0:
            break
        content = message.get("content")
        if type(content) is str:
            text = content
            update(_SEP)
        else:
            text, extra = _text(content)
            update(extra + _SEP)
        take = int(budget * CHARS_PER_TOKEN + 0.5)
        if take <= len(text):
            update(text[:take].encode())
            break
        update(text.encode() + _END)
        budget -= len(text) / CHARS_PER_TOKEN
    else:
        # The messages end before 1,024 tokens: a prompt of 1,024 with the reply's framing is
        # still cacheable (prompt_tokens' rule), and the whole of it is the prefix.
        if PREFIX_TOKENS - budget + REPLY_TOKENS < PREFIX_TOKENS or prompt_tokens(
            body
        ) < PREFIX_TOKENS:
            return None
        update(_REPLY)
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def prefix_digests(body: Mapping[str, Any]) -> tuple[tuple[int, bytes], ...]:
    """(tokens, digest) of each cacheable prefix of the request, shortest first.

    One at `PREFIX_TOKENS` and one every `STEP_TOKENS` after it, up to `cacheable_tokens`;
    empty for a prompt too short to cache. Two requests share a cached prefix of N tokens where
    their digests at N are equal (the model is in every digest).
    """
    total = prompt_tokens(body)
    last = _cacheable(total)
    if not last:
        return ()
    model = body.get("model")
    digest = _hasher(model)
    update = digest.update
    out: list[tuple[int, bytes]] = []
    boundary = PREFIX_TOKENS
    used = 0.0  # tokens taken so far
    for message in body.get("messages") or ():
        role = message.get("role") if isinstance(message, Mapping) else None
        update(_SEP)
        update(str(role).encode())
        used += MESSAGE_TOKENS
        while used >= boundary and boundary <= last:
            out.append((boundary, digest.copy().digest()[:8]))
            boundary += STEP_TOKENS
        content = message.get("content") if isinstance(message, Mapping) else None
        text, extra = _text(content)
        if extra:
            update(extra)
        update(_SEP)
        start = 0
        while boundary <= last and used + (len(text) - start) / CHARS_PER_TOKEN >= boundary:
            cut = start + int((boundary - used) * CHARS_PER_TOKEN + 0.5)
            update(text[start:cut].encode())
            used += (cut - start) / CHARS_PER_TOKEN
            start = cut
            out.append((boundary, digest.copy().digest()[:8]))
            boundary += STEP_TOKENS
        if boundary > last:
            break
        update(text[start:].encode())
        update(_END)
        used += (len(text) - start) / CHARS_PER_TOKEN
    else:
        update(_REPLY)
        used += REPLY_TOKENS
        while used >= boundary and boundary <= last:
            out.append((boundary, digest.copy().digest()[:8]))
            boundary += STEP_TOKENS
    return tuple(out)


class PrefixCache:
    """What a gateway's prompt cache would bill as cached, for requests sent one after another.

    Every prefix of every request seen is kept (no expiry): the figure a run sending each
    group of rows together (`--order prefix`) comes near, a group's first request paying in
    full and the others their longest prefix already seen, in steps of 128 tokens.

    >>> cache = PrefixCache()
    >>> [cache.cached_tokens(body) for body in (doc_question_1, doc_question_2)]
    [0, 1536]
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def cached_tokens(self, body: Mapping[str, Any]) -> int:
        """The cached tokens of this request; then its prefixes count as cached for later ones."""
        seen = self._seen
        cached = 0
        digests = prefix_digests(body)
        for tokens, digest in digests:
            if digest not in seen:
                break
            cached = tokens
        seen.update(digest for _, digest in digests)
        return cached
