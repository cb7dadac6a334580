"""The one scrubber: API keys masked in any text batchrunner writes or prints.

A gateway or a proxy may echo the `Authorization` header in an error message; a traceback may
hold a key in a local variable. Text from those places goes through `scrub` before it reaches a
result's `error`, a checkpoint, a summary, a log line or `crash.log`:

    remember_key("sk-proj-0123456789abcdef")  # done where a key is resolved (config.py)
    scrub("HTTP 401: bad key Bearer sk-proj-0123456789abcdef")   # 'HTTP 401: bad key Bearer [key]'

Masked are the keys this process resolved, the values of the key variables, and anything shaped
like a key: `sk-...`, a token of 8 or more characters after `Bearer `, and a run of 32 or more letters and digits with
both in it (a dashless key such as Azure's). Words, paths and numbers stay as they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

__all__ = ["KEY_MASK", "key_values", "remember_key", "scrub"]

#: What a key is replaced with.
KEY_MASK = "[key]"

#: The variables a key is read from when none is named (see config.API_KEY_ENVS).
_DEFAULT_VARIABLES = ("RU_LLM_API_KEY", "OPENAI_API_KEY")
_SHORTEST_KEY = 6  # shorter values are not keys, and masking them would eat ordinary words

_KEY_SHAPED = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{6,}"  # OpenAI-style, whatever the project prefix (sk-proj-, sk-ru-)
    r"|(?<![A-Za-z0-9])(?P<bearer>[Bb]earer\s+)[^\s'\",;)\]}]{8,}"  # a bearer token
    r"|(?<![A-Za-z0-9_\-])(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}"
    r"(?![A-Za-z0-9_\-])"  # a long dashless token holding both letters and digits
)

_known: set[str] = set()


def remember_key(key: str) -> None:
    """Have every later `scrub` in this process mask `key` (a key batchrunner resolved)."""
    key = key.strip()
    if len(key) >= _SHORTEST_KEY:
        _known.add(key)


def key_values(names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> set[str]:
    """The values of the default key variables and of `names`: the keys a text may hold."""
    environ = os.environ if environ is None else environ
    values = {environ.get(name, "").strip() for name in (*_DEFAULT_VARIABLES, *names)}
    return {value for value in values if len(value) >= _SHORTEST_KEY}


def _mask(match: re.Match[str]) -> str:
    return (match.group("bearer") or "") + KEY_MASK


def scrub(text: str, keys: Iterable[str] = ()) -> str:
    """`text` with `keys`, the remembered keys, the key variables' values and key shapes masked."""
    secrets = {*_known, *key_values(), *(k.strip() for k in keys)}
    for secret in sorted((s for s in secrets if len(s) >= _SHORTEST_KEY), key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, KEY_MASK)
    return _KEY_SHAPED.sub(_mask, text)
