"""Tests that need an optional part of the test environment: say what to install.

The `test` extra is the core; Ray, moto's S3 server and Selenium come with the `test-ray`,
`test-s3` and `test-browser` extras (all of them: `test-all`, which the README's test command
and CI install). Without one, its tests are skipped with a reason that names what to install
(shown by `-ra`, which pyproject's addopts turns on); with CI set, they fail instead, so a CI
that lost a dependency cannot go green by skipping.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def missing(what: str, install: str) -> None:
    """Skip (fail in CI) the tests of `what`, which need `install`."""
    __tracebackhide__ = True  # the summary names the test module or fixture that asked
    message = f"{what} need {install}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: not skipped)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module`, imported; else the tests of `what` are skipped, naming the extra."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(module)
    except ImportError:
        missing(what, f"{module.partition('.')[0]}: pip install -e '.[{extra}]' (or '.[test-all]')")
        raise  # not reached: missing() raises
