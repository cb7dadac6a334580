"""Prompt caching as OpenAI reports it: `usage.prompt_tokens_details.cached_tokens`.

The real rule: a prompt of at least 1024 tokens has its prefix cached, in steps of 128 tokens
(1024, 1152, 1280, ...); a later prompt that starts with a cached prefix reports the longest
such prefix as cached. Here the prefixes are hashes of the prompt's token sequence (framing
included, see `tokens.prompt_token_stream`), per model.

And the real timing: a prefix is cached once the answer to a request carrying it is complete
(`store`, called then), not when the request arrives; a request's cached tokens are decided
when it arrives (`lookup`), against the prefixes cached by then, so requests in flight at the
same time do not see each other's. A prefix unused for `ttl_s` seconds expires; a request that
hits it refreshes it. At most `capacity` prefixes are kept, the least recently used go first.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from batchrunner.simulator.tokens import prompt_token_stream

__all__ = ["PromptCache"]

Prefixes = tuple[tuple[int, bytes], ...]


class PromptCache:
    """Which prompt prefixes are cached, and how many tokens of a new prompt they cover.

    >>> cache = PromptCache(ttl_s=300)
    >>> prefixes = cache.prefix_digests("gpt-4o", messages)
    >>> cache.lookup(prefixes)   # on arrival: 0 the first time
    >>> cache.store(prefixes)    # once the answer is complete
    """

    def __init__(
        self,
        min_tokens: int = 1024,
        step_tokens: int = 128,
        capacity: int = 200_000,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.min_tokens = min_tokens
        self.step_tokens = step_tokens
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._clock = clock
        # digest -> when last used; oldest use first (the clock never goes back)
        self._used: OrderedDict[bytes, float] = OrderedDict()

    def prefix_digests(self, model: str, messages: Iterable[Mapping[str, Any]]) -> Prefixes:
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

    def lookup(self, prefixes: Prefixes) -> int:
        """Cached tokens for a prompt with these prefixes, arriving now; the hits are refreshed."""
        now = self._clock()
        self._expire(now)
        used = self._used
        cached = 0
        for length, digest in prefixes:
            if digest not in used:
                break
            used[digest] = now
            used.move_to_end(digest)
            cached = length
        return cached

    def store(self, prefixes: Prefixes) -> None:
        """The answer to a prompt with these prefixes is complete: they are cached from now."""
        now = self._clock()
        used = self._used
        for _length, digest in prefixes:
            used[digest] = now
            used.move_to_end(digest)
        self._expire(now)
        while len(used) > self.capacity:
            used.popitem(last=False)

    def __len__(self) -> int:
        """How many prefixes are cached (expired ones may linger until the next lookup)."""
        return len(self._used)

    def clear(self) -> None:
        """Forget every prefix."""
        self._used.clear()

    def _expire(self, now: float) -> None:
        used = self._used
        horizon = now - self.ttl_s
        while used:
            digest, last = next(iter(used.items()))
            if last > horizon:
                return
            del used[digest]
