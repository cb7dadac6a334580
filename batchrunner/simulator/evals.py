"""Answers to the sample evaluation sets: right for some models more often than for others.

The simulator recognises two question formats of `sample_data/` (made by make_samples.py):

- short-answer arithmetic: "Calculate 4,821 + 1,397." (also -, ×, ÷);
- multiple choice: a question, then option lines "A) ...", "B) ...", and the line
  "Answer with the letter of the correct option." The question is one the simulator can work
  out itself (a sum, the prime, the largest number, the first word alphabetically, a word's
  length).

It answers correctly with a probability that depends on the model (MODEL_SKILL) and on the
kind of question, drawn from the request's own seed material: the same request always gets
the same answer, and two models get independent draws. Any other prompt is not recognised
(None), so the simulator's answers to everything else are unchanged.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

__all__ = ["MODEL_SKILL", "eval_answer"]

MODEL_SKILL: dict[str, float] = {
    "gpt-4o": 0.92,
    "claude-3-5-sonnet-20241022": 0.90,
    "gpt-4o-mini": 0.76,
    "claude-3-5-haiku-20241022": 0.70,
}
"""The chance a model answers a question of ordinary difficulty correctly."""

_EASE = {"sum": 1.04, "prime": 0.85, "largest": 1.0, "alphabet": 0.95, "length": 0.9,
         "+": 1.05, "-": 1.0, "×": 0.9, "÷": 0.95}

_NUMBER = r"[-−]?\d{1,3}(?:,\d{3})*(?:\.\d+)?|[-−]?\d+(?:\.\d+)?"
_ARITHMETIC = re.compile(rf"Calculate ({_NUMBER}) ([-+×÷−]) ({_NUMBER})\.?\s*$")
_OPTION = re.compile(r"^([A-H])\) (.+)$", re.MULTILINE)
_CHOICE_MARK = "Answer with the letter of the correct option."


def _draws(seed: bytes, index: int) -> tuple[float, float, float]:
    """Three uniform numbers in [0, 1) for choice `index` of a request."""
    raw = hashlib.blake2b(b"eval\x1d%d\x1d%s" % (index, seed), digest_size=6).digest()
    a, b, c = struct.unpack(">3H", raw)
    return a / 65536, b / 65536, c / 65536


def _decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", "").replace("−", "-"))


def _format(value: Decimal, grouped: bool) -> str:
    value = value.normalize() if value != value.to_integral() else value.quantize(Decimal(1))
    text = f"{value:,f}" if grouped else f"{value:f}"
    return text


def _arithmetic(text: str) -> tuple[str, Decimal] | None:
    match = _ARITHMETIC.search(text)
    if match is None:
        return None
    try:
        a, b = _decimal(match.group(1)), _decimal(match.group(3))
    except InvalidOperation:
        return None
    op = match.group(2).replace("−", "-")
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    elif op == "×":
        result = a * b
    else:
        if b == 0:
            return None
        result = (a / b).quantize(Decimal("0.01"))
    return op, result


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


_SOLVERS: list[tuple[str, re.Pattern[str], Callable[[re.Match[str], list[str]], int | None]]] = [
    ("sum", re.compile(r"What is (\d+) \+ (\d+)\?"),
     lambda m, opts: _index_of(opts, str(int(m.group(1)) + int(m.group(2))))),
    ("prime", re.compile(r"Which of these numbers is prime\?"),
     lambda m, opts: _only(opts, lambda o: o.isdigit() and _is_prime(int(o)))),
    ("largest", re.compile(r"Which of these numbers is the largest\?"),
     lambda m, opts: max(range(len(opts)), key=lambda i: float(opts[i]))),
    ("alphabet", re.compile(r"Which word comes first in alphabetical order\?"),
     lambda m, opts: min(range(len(opts)), key=lambda i: opts[i].lower())),
    ("length", re.compile(r"How many letters are in the word '([a-z]+)'\?"),
     lambda m, opts: _index_of(opts, str(len(m.group(1))))),
]


def _index_of(options: list[str], value: str) -> int | None:
    return options.index(value) if value in options else None


def _only(options: list[str], test: Callable[[str], bool]) -> int | None:
    hits = [i for i, o in enumerate(options) if test(o)]
    return hits[0] if len(hits) == 1 else None


def _choice(text: str) -> tuple[str, int, list[str]] | None:
    if _CHOICE_MARK not in text:
        return None
    options = _OPTION.findall(text)
    letters = [letter for letter, _ in options]
    if len(options) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        return None
    texts = [option.strip() for _, option in options]
    for kind, pattern, solve in _SOLVERS:
        match = pattern.search(text)
        if match:
            try:
                right = solve(match, texts)
            except ValueError:
                return None
            return (kind, right, texts) if right is not None else None
    return None


def eval_answer(model: str, prompt: str, seed: bytes, index: int = 0) -> str | None:
    """The answer to a sample-eval question, or None when `prompt` is not one."""
    arithmetic = _arithmetic(prompt)
    choice = None if arithmetic is not None else _choice(prompt)
    if arithmetic is None and choice is None:
        return None
    luck, pick, style = _draws(seed, index)
    skill = MODEL_SKILL.get(model, 0.8)
    if arithmetic is not None:
        op, value = arithmetic
        if luck >= min(skill * _EASE[op], 0.99):
            # A plausible slip: a digit off in one place.
            step = Decimal(10) ** int(pick * 3)
            value = value + step if style < 0.5 else value - step
        forms = ("{g}", "{p}", "The answer is {g}.", "= {p}")
        form = forms[int(style * len(forms))]
        return form.format(g=_format(value, True), p=_format(value, False))
    kind, right, texts = choice  # type: ignore[misc]
    chosen = right
    if luck >= min(skill * _EASE[kind], 0.99):
        others = [i for i in range(len(texts)) if i != right]
        chosen = others[int(pick * len(others))]
    letter = chr(ord("A") + chosen)
    forms = ("{L}", "The answer is {L}.", "Answer: ({l})", "{L}) {text}")
    form = forms[int(style * len(forms))]
    return form.format(L=letter, l=letter.lower(), text=texts[chosen])
