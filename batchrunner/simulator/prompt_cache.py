"""Prompt caching as OpenAI reports it: `usage.prompt_tokens_details.cached_tokens`.

The real rule: a prompt of at least 1024 tokens has its prefix cached, in steps of 128 tokens
(1024, 1152, 1280, ...); a later prompt that starts with a cached prefix reports the longest
such prefix as cached. Here the prefixes are hashes of the prompt's token sequence (framing
included, see `tokens.prompt_token_stream`), per model, kept for the latest `capacity` prefixes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Iterable, Mapping

from batchrunner.simulator.tokens import prompt_token_stream

__all__ = ["PromptCache"]


class PromptCache:
    """Which prompt prefixes were seen, and how many tokens of a new prompt they cover."""

    def __init__(self, min_tokens: int = 1024, step_tokens: int = 128, capacity: int = 200_000):
        self.min_tokens = min_tokens
        self.step_tokens = step_tokens
        self.capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def prefix_digests(
        self, model: str, messages: Iterable[Mapping[str, Any]]
    ) -> tuple[tuple[int, bytes], ...]:
        """(length, digest) of every cacheable prefix of the prompt, shortest first."""
        tokens = prompt_token_stream(messages)
        if len(tokens) < self.min_tokens:
            return ()
        digest = hashlib.blake2b(model.encode(), digest_size=16)
        prefixes = []
        boundary = self.min_tokens
        for length, token in enumerate(tokens, start=1):
            digest.update(token.encode())
            digest.update(b"\x00")
            if length == boundary:
                prefixes.append((length, digest.copy().digest()))
                boundary += self.step_tokens
        return tuple(prefixes)

    def lookup_and_store(self, prefixes: tuple[tuple[int, bytes], ...]) -> int:
        """Cached tokens for a prompt with these prefixes; then remember them for later ones."""
        seen = self._seen
        cached = 0
        for length, digest in prefixes:
            if digest not in seen:
                break
            seen.move_to_end(digest)
            cached = length
        for _length, digest in prefixes:
            seen[digest] = None
        while len(seen) > self.capacity:
            seen.popitem(last=False)
        return cached

    def clear(self) -> None:
        """Forget every prefix."""
        self._seen.clear()
