"""Chat completions without a server: answer a checked request (`chat_request.parse_request`).

`complete(body)` is a pure function: the same body always gives the same texts, finish reasons
and usage, so tests anywhere can compute what the simulator will answer. The answer depends on
the model, the messages, `temperature`, `top_p` and `seed`; `n`, `max_tokens` and `stop` only
choose how many answers and where they end, so choice 0 of `n=3` is the answer of `n=1`.

Answers are sentences built from a small vocabulary and the longer words of the prompt, 10 to
about 150 tokens long (40 to 80 on average, longer for longer prompts); token counts follow the
rule of `batchrunner.simulator.tokens`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import struct
from dataclasses import dataclass
from typing import Any

from batchrunner.simulator import json_answers
from batchrunner.simulator.chat_request import ChatRequest, parse_request
from batchrunner.simulator.config import MODELS
from batchrunner.simulator.evals import eval_answer
from batchrunner.simulator.tokens import (
    WORD_CHARS_PER_TOKEN as _WORD_CHARS_PER_TOKEN,
)
from batchrunner.simulator.tokens import (
    count_prompt_tokens,
    count_tokens,
    message_text,
    truncate_tokens,
)

__all__ = ["Completion", "Usage", "answer", "complete"]


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, as the simulator reports them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # inside completion_tokens, as OpenAI counts them

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        """The OpenAI `usage` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


@dataclass(frozen=True)
class Completion:
    """The answer to a request: one text and finish reason per choice, and the usage.

    `usage.cached_tokens` is 0 here: prompt caching depends on what the server saw before.
    """

    model: str  # the dated snapshot that answers, as a response's `model` names it
    texts: tuple[str, ...]
    finish_reasons: tuple[str, ...]
    usage: Usage
    # per choice: its tool calls (`{id, type, function: {name, arguments}}`), None for text
    tool_calls: tuple[tuple[dict[str, Any], ...] | None, ...] | None = None
    # per choice: its logprobs `content` list, when the request asked for logprobs
    logprobs: tuple[tuple[dict[str, Any], ...], ...] | None = None


def complete(body: Any) -> Completion:
    """Check a request body and compute the simulator's answer, without any server.

    Raises ApiError for a body the real API would refuse (400, or 404 for an unknown model).

    >>> complete({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}).usage
    """
    return answer(parse_request(body))


# -- checking ------------------------------------------------------------------------------
# -- answering -----------------------------------------------------------------------------

_NOUNS = (
    "answer", "approach", "balance", "choice", "context", "data", "detail", "effect", "example",
    "factor", "goal", "idea", "impact", "method", "model", "outcome", "pattern", "point",
    "process", "question", "reason", "result", "risk", "setting", "signal", "source", "step",
    "structure", "system", "task", "value", "view", "change", "cost", "level", "rule", "team",
    "test", "tool", "trend", "version", "design", "problem", "option", "limit", "measure",
)  # fmt: skip
_ADJECTIVES = (
    "clear", "common", "careful", "different", "direct", "early", "familiar", "general",
    "important", "key", "large", "likely", "main", "natural", "new", "obvious", "practical",
    "precise", "recent", "reliable", "simple", "small", "specific", "strong", "typical",
    "useful", "wider", "stable", "basic", "central",
)  # fmt: skip
_VERBS = (
    "affects", "changes", "complements", "connects to", "defines", "depends on", "describes",
    "explains", "follows", "improves", "includes", "influences", "limits", "matches",
    "reflects", "requires", "shapes", "supports", "suggests", "outweighs", "builds on",
    "points to", "relies on", "leads to",
)  # fmt: skip
_DETERMINERS = ("the", "the", "the", "this", "each", "every", "that", "one", "any")
_OPENERS = (
    "", "", "", "", "In short,", "In practice,", "For example,", "However,", "As a result,",
    "Overall,", "In most cases,", "Put simply,", "At the same time,", "First,", "Then",
    "Finally,", "Still,", "Broadly speaking,",
)  # fmt: skip
_TAILS = (
    "", "", "", "over time", "in most cases", "for most readers", "when the {n} changes",
    "because of the {n}", "with a {a} {n}", "rather than the {n}", "as the {n} grows",
    "in a {a} way", "and the {n} follows", "so the {n} stays {a}", "unless the {n} is {a}",
)  # fmt: skip
_STOPWORDS = frozenset(
    "about above after again against also because been before being below between both "
    "could does doing down during each from further have having here into itself just more "
    "most must only other over same should some such than that their them then there these "
    "they this those through under until very what when where which while will with would "
    "your yours please write give tell explain answer make".split()
)
_PROMPT_WORD = re.compile(r"[^\W\d_]{4,}")
_MEAN_TOKENS = 30.0  # mean answer length for a short prompt; longer prompts get longer answers
_MIN_TOKENS = 10
_MAX_TARGET_TOKENS = 135  # the last sentence may run over it by a few tokens
_BANK_SIZE = 2048
_SLOT = "\x00"  # where a sentence template takes a word of the prompt


@dataclass(frozen=True)
class _Template:
    """A sentence with slots for prompt words, and the same sentence with vocabulary instead."""

    parts: tuple[str, ...]  # the text around the slots
    tokens: int  # tokens of `parts`, slots excluded
    filled: str
    filled_tokens: int


def _sentence(rng: random.Random) -> tuple[str, str]:
    """One sentence as (template with slots, the same with vocabulary nouns in the slots)."""
    rand = rng.random

    def pick(words: tuple[str, ...]) -> str:
        return words[int(rand() * len(words))]

    def noun() -> str:
        return _SLOT if rand() < 0.45 else pick(_NOUNS)

    subject = f"{pick(_DETERMINERS)} {pick(_ADJECTIVES) + ' ' if rand() < 0.5 else ''}{noun()}"
    obj = f"{pick(_DETERMINERS)} {pick(_ADJECTIVES) + ' ' if rand() < 0.6 else ''}{noun()}"
    tail = pick(_TAILS)
    if tail:
        tail = " " + tail.format(n=noun(), a=pick(_ADJECTIVES))
    opener = pick(_OPENERS)
    text = f"{opener} {subject}" if opener else subject
    template = f"{text[0].upper()}{text[1:]} {pick(_VERBS)} {obj}{tail}."
    filled = template
    while _SLOT in filled:
        filled = filled.replace(_SLOT, pick(_NOUNS), 1)
    if filled[0].islower():
        filled = filled[0].upper() + filled[1:]
    return template, filled


@functools.cache
def _bank() -> tuple[_Template, ...]:
    """A fixed bank of sentences that answers are drawn from (built once, on first use)."""
    rng = random.Random(20241022)
    bank = []
    for _ in range(_BANK_SIZE):
        template, filled = _sentence(rng)
        parts = tuple(template.split(_SLOT))
        bank.append(
            _Template(
                parts=parts,
                tokens=sum(count_tokens(part) for part in parts),
                filled=filled,
                filled_tokens=count_tokens(filled),
            )
        )
    return tuple(bank)


def _topic_words(messages: tuple[dict[str, Any], ...]) -> tuple[str, ...]:
    """Up to 12 distinct longer words of the user's messages, to weave into the answer."""
    seen: dict[str, None] = {}
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        for word in _PROMPT_WORD.findall(message_text(message)):
            word = word.lower()
            if word not in _STOPWORDS:
                seen[word] = None
                if len(seen) == 12:
                    return tuple(seen)
    return tuple(seen)


def _request_seed(request: ChatRequest) -> bytes:
    """Seed material from what decides the answer: model, messages, temperature, top_p, seed."""
    return "\x1e".join(
        [
            request.model,
            repr((request.temperature, request.top_p, request.seed)),
            *(
                f"{message.get('role')}\x1f{message.get('name', '')}\x1f{message_text(message)}"
                for message in request.messages
            ),
        ]
    ).encode("utf-8", "surrogatepass")


def _randomness(seed: bytes, index: int, count: int) -> tuple[int, ...]:
    """`count` pseudo-random 16-bit numbers for choice `index`, derived from the seed."""
    stream = hashlib.shake_128(b"%d\x1d%s" % (index, seed)).digest(2 * count)
    return struct.unpack(f">{count}H", stream)


def _generate(seed: bytes, index: int, topics: tuple[str, ...], mean: float) -> tuple[str, int]:
    """A natural answer (before stop and max_tokens) and its token count."""
    bank = _bank()
    values = _randomness(seed, index, 128)
    # Answer length: an Erlang (gamma, shape 3) draw around `mean`, within the bounds.
    uniform = ((values[0] + 1) / 65536) * ((values[1] + 1) / 65536) * ((values[2] + 1) / 65536)
    target = min(max(int(-mean / 3 * math.log(uniform)), _MIN_TOKENS), _MAX_TARGET_TOKENS)
    position = 3
    sentences: list[str] = []
    tokens = 0
    while tokens < target:
        if position + 4 > len(values):  # long answers with many prompt words: draw more
            values = _randomness(seed, index, 128 + len(values))
        template = bank[values[position] & (_BANK_SIZE - 1)]
        position += 1
        slots = len(template.parts) - 1
        if topics and slots:
            pieces = [template.parts[0]]
            for part in template.parts[1:]:
                word = topics[values[position] % len(topics)]
                position += 1
                pieces += (word, part)
                tokens += -(-len(word) // _WORD_CHARS_PER_TOKEN)  # a prompt word is all letters
            sentence = "".join(pieces)
            sentences.append(sentence[0].upper() + sentence[1:])
            tokens += template.tokens
        else:
            sentences.append(template.filled)
            tokens += template.filled_tokens
    return " ".join(sentences), tokens


def _cut(text: str, tokens: int, request: ChatRequest) -> tuple[str, int, str]:
    """Apply the stop sequences, then max_tokens, as a model generating left to right would."""
    if request.stop:
        ends = [i for i in (text.find(s) for s in request.stop) if i >= 0]
        if ends:
            text = text[: min(ends)]
            tokens = count_tokens(text)
    if request.max_tokens is not None and tokens > request.max_tokens:
        return truncate_tokens(text, request.max_tokens), request.max_tokens, "length"
    return text, tokens, "stop"


def _last_user_text(messages: tuple[dict[str, Any], ...]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return ""


def _json_answer(
    request: ChatRequest, seed: bytes, index: int, topics: tuple[str, ...]
) -> tuple[str, int]:
    """A JSON answer: valid against the json_schema, or an object for json_object."""
    response_format = request.response_format
    assert response_format is not None
    schema = response_format.get("schema")
    if schema is None:  # json_object: any object will do; one with the natural answer
        text, _ = _generate(seed, index, topics, _MEAN_TOKENS)
        value: Any = {"answer": text}
    else:
        material = b"%d\x1d%s\x1d%s" % (
            index, seed, json.dumps(schema, sort_keys=True).encode()
        )
        value = json_answers.json_value(schema, material, topics)
    text = json_answers.render(value)
    return text, count_tokens(text)


def _tool_call(
    request: ChatRequest, seed: bytes, index: int, topics: tuple[str, ...]
) -> tuple[dict[str, Any], int]:
    """A call of the named function (or, for "required", one of the tools chosen by the
    request), its arguments valid JSON for the function's parameters; and their tokens."""
    functions = request.tools
    if request.tool_choice == "required":
        function = functions[_randomness(seed, index, 1)[0] % len(functions)]
    else:
        function = next(f for f in functions if f["name"] == request.tool_choice)
    material = b"%d\x1d%s\x1dtool\x1d%s" % (
        index, seed, json.dumps(function, sort_keys=True).encode()
    )
    arguments = json_answers.render(json_answers.json_value(function["parameters"], material,
                                                            topics))
    call_id = "call_" + hashlib.sha256(material).hexdigest()[:24]
    call = {"id": call_id, "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}
    return call, count_tokens(arguments)


def _reasoning(request: ChatRequest, seed: bytes, index: int) -> int:
    """The reasoning tokens a reasoning model spends on a choice (0 for other models)."""
    if not MODELS[request.model].reasoning:
        return 0
    return 64 + _randomness(seed, index ^ 0x5EA5, 1)[0] % 192


def _logprob_entries(text: str, seed: bytes, index: int, top: int) -> tuple[dict[str, Any], ...]:
    """`logprobs.content` of a text: one entry per word piece (the pieces a stream sends)."""
    pieces = _WORD_PIECES.findall(text)
    values = _randomness(seed, index ^ 0x10B5, max(1, len(pieces) * (1 + top)))
    entries = []
    for number, piece in enumerate(pieces):
        drawn = values[number * (1 + top) : (number + 1) * (1 + top)]
        logprob = -round(drawn[0] / 65535 * 2.5, 6)
        alternatives = [{"token": piece, "logprob": logprob, "bytes": list(piece.encode())}]
        for rank in range(1, top):
            other = _NOUNS[drawn[rank] % len(_NOUNS)]
            alternatives.append({"token": other, "logprob": round(logprob - rank - 0.5, 6),
                                 "bytes": list(other.encode())})
        entries.append({"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                        "top_logprobs": alternatives[:top]})
    return tuple(entries)


_WORD_PIECES = re.compile(r"\s*\S+|\s+")  # the pieces a stream sends, one a chunk


def answer(request: ChatRequest) -> Completion:
    """The simulator's deterministic answer to a checked request."""
    prompt_tokens = count_prompt_tokens(request.messages)
    seed = _request_seed(request)
    topics = _topic_words(request.messages)
    mean = _MEAN_TOKENS + min(prompt_tokens, 500) / 10
    texts: list[str] = []
    reasons: list[str] = []
    calls: list[tuple[dict[str, Any], ...] | None] = []
    completion_tokens = reasoning_tokens = 0
    question = _last_user_text(request.messages)
    for index in range(request.n):
        reasoning = _reasoning(request, seed, index)
        limit = request.max_tokens
        if limit is not None and reasoning >= limit:  # reasoning used up the limit: no answer
            texts.append("")
            reasons.append("length")
            calls.append(None)
            completion_tokens += limit
            reasoning_tokens += limit
            continue
        cut = request if limit is None or not reasoning else dataclasses.replace(
            request, max_tokens=limit - reasoning
        )
        graded = eval_answer(request.model, question, seed, index)
        call = None
        if request.tool_choice is not None:
            call, tokens = _tool_call(request, seed, index, topics)
            arguments, tokens, reason = _cut(call["function"]["arguments"], tokens,
                                             dataclasses.replace(cut, stop=()))
            call["function"]["arguments"] = arguments
            text, reason = "", "tool_calls" if reason == "stop" else reason
        elif request.response_format is not None:
            text, tokens, reason = _cut(*_json_answer(request, seed, index, topics), cut)
        elif graded is not None:
            text, tokens, reason = _cut(graded, count_tokens(graded), cut)
        else:
            text, tokens, reason = _cut(*_generate(seed, index, topics, mean), cut)
        texts.append(text)
        reasons.append(reason)
        calls.append(None if call is None else (call,))
        completion_tokens += tokens + reasoning
        reasoning_tokens += reasoning
    logprobs = None
    if request.logprobs:
        logprobs = tuple(
            _logprob_entries(text, seed, index, request.top_logprobs)
            for index, text in enumerate(texts)
        )
    return Completion(
        model=MODELS[request.model].snapshot,
        texts=tuple(texts),
        finish_reasons=tuple(reasons),
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    reasoning_tokens=reasoning_tokens),
        tool_calls=tuple(calls) if any(c is not None for c in calls) else None,
        logprobs=logprobs,
    )
