"""The cacheable prefix of a request (inputs/prefixes.py): its key, its length, the cache model."""

from __future__ import annotations

import random

from batchrunner.inputs.prefixes import (
    PREFIX_TOKENS,
    STEP_TOKENS,
    PrefixCache,
    cacheable_tokens,
    prefix_digests,
    prefix_key,
    prompt_tokens,
)
from batchrunner.inputs.requests import CHARS_PER_TOKEN, MESSAGE_TOKENS, REPLY_TOKENS


def _words(seed: int, chars: int) -> str:
    rng = random.Random(seed)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "epsilon"]) for _ in range(chars))
    return text[:chars]


def _body(document: str, question: str, model: str = "gpt-4o-mini",
          system: str | None = "Answer from the document.") -> dict:
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": f"{document}\n\nQuestion: {question}"})
    return {"model": model, "messages": messages, "max_tokens": 50}


DOC_A = _words(1, 6_000)  # about 1,500 estimated tokens
DOC_B = _words(2, 6_000)


def test_prompt_tokens_follow_the_estimate_rule() -> None:
    body = {"messages": [{"role": "system", "content": "x" * 40},
                         {"role": "user", "content": "y" * 400}]}
    assert prompt_tokens(body) == int(440 / CHARS_PER_TOKEN) + 2 * MESSAGE_TOKENS + REPLY_TOKENS
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 400},
                                                       {"type": "image_url", "image_url": {}}]}]}
    assert prompt_tokens(parts) == 100 + MESSAGE_TOKENS + REPLY_TOKENS


def test_a_prompt_shorter_than_1024_tokens_has_no_key_and_nothing_cacheable() -> None:
    short = _body("a short document", "why?")
    assert prefix_key(short) is None
    assert cacheable_tokens(short) == 0
    assert prefix_digests(short) == ()
    assert prefix_key({"model": "m", "messages": []}) is None
    assert prefix_key({"model": "m"}) is None


def test_cacheable_tokens_are_1024_then_steps_of_128() -> None:
    def tokens_of(chars: int) -> int:
        return cacheable_tokens({"messages": [{"role": "user", "content": "x" * chars}]})

    framing = MESSAGE_TOKENS + REPLY_TOKENS
    assert tokens_of((PREFIX_TOKENS - framing - 1) * 4) == 0
    assert tokens_of((PREFIX_TOKENS - framing) * 4) == PREFIX_TOKENS
    assert tokens_of((PREFIX_TOKENS + STEP_TOKENS - framing) * 4 - 4) == PREFIX_TOKENS
    assert tokens_of((PREFIX_TOKENS + STEP_TOKENS - framing) * 4) == PREFIX_TOKENS + STEP_TOKENS
    assert tokens_of(40_000) == 9_984  # 10,007 estimated tokens: 1,024 + 70 steps


def test_rows_sharing_their_leading_1024_tokens_share_a_key() -> None:
    one, two = _body(DOC_A, "who?"), _body(DOC_A, "when and where, exactly?")
    assert prefix_key(one) is not None
    assert prefix_key(one) == prefix_key(two)
    assert isinstance(prefix_key(one), int) and -(2**63) <= prefix_key(one) < 2**63
    # another document, another model, another system message, another role: another key
    assert prefix_key(_body(DOC_B, "who?")) != prefix_key(one)
    assert prefix_key(_body(DOC_A, "who?", model="gpt-4o")) != prefix_key(one)
    assert prefix_key(_body(DOC_A, "who?", system="Be brief.")) != prefix_key(one)
    assert prefix_key(_body(DOC_A, "who?", system=None)) != prefix_key(one)
    # a change past the 1,024th token does not change the key, one before it does
    edited_late = _body(DOC_A[:5_000] + "Z" + DOC_A[5_001:], "who?")
    edited_early = _body(DOC_A[:100] + "Z" + DOC_A[101:], "who?")
    assert prefix_key(edited_late) == prefix_key(one)
    assert prefix_key(edited_early) != prefix_key(one)


def test_message_boundaries_are_part_of_the_prefix() -> None:
    text = _words(3, 5_000)
    whole = {"model": "m", "messages": [{"role": "user", "content": text}]}
    split = {"model": "m", "messages": [{"role": "user", "content": text[:10]},
                                        {"role": "user", "content": text[10:]}]}
    assert prefix_key(whole) != prefix_key(split)


def test_the_key_is_the_digest_of_the_first_cacheable_prefix() -> None:
    rng = random.Random(7)
    for _ in range(200):
        messages = [{"role": rng.choice(["system", "user", "assistant"]),
                     "content": _words(rng.randrange(10**6), rng.randrange(0, 2_500))}
                    for _ in range(rng.randrange(1, 6))]
        body = {"model": "m", "messages": messages}
        digests = prefix_digests(body)
        key = prefix_key(body)
        assert (key is None) == (not digests)
        if digests:
            assert key == int.from_bytes(digests[0][1], "little", signed=True)
            lengths = [tokens for tokens, _ in digests]
            assert lengths == list(range(PREFIX_TOKENS, cacheable_tokens(body) + 1, STEP_TOKENS))


def test_the_cache_model_bills_a_group_s_later_rows_their_shared_prefix() -> None:
    cache = PrefixCache()
    questions = ["who?", "when?", "where did it happen?"]
    a = [cache.cached_tokens(_body(DOC_A, q)) for q in questions]
    b = [cache.cached_tokens(_body(DOC_B, q)) for q in questions]
    shared = cacheable_tokens(_body(DOC_A, ""))  # the document and system message, both rows'
    assert a[0] == 0 and b[0] == 0  # the first of each group pays in full
    for cached in (*a[1:], *b[1:]):
        assert shared - STEP_TOKENS <= cached <= shared
        assert cached >= PREFIX_TOKENS and cached % STEP_TOKENS == 0
    # the same request again has its whole cacheable prompt cached
    assert cache.cached_tokens(_body(DOC_A, "who?")) == cacheable_tokens(_body(DOC_A, "who?"))
    # a short prompt is never cached
    assert cache.cached_tokens(_body("short", "why?")) == 0
