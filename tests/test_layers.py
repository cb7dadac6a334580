"""The layering of issue 15: the engine does not know the simulator; no module reaches up."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

import batchrunner
from batchrunner import local
from batchrunner.errors import UsageError

PACKAGE = Path(batchrunner.__file__).parent


def test_importing_the_engine_does_not_import_the_simulator() -> None:
    code = (
        "import sys, batchrunner.engine\n"
        "assert 'batchrunner.engine' in sys.modules\n"
        "print('batchrunner.gateway' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "False"


def test_the_command_line_starts_without_pandas_or_jsonschema() -> None:
    """Each costs a tenth of a second or more to import: `status`, `--help` and runs without a
    schema need neither (a module-level `pa.scalar` once pulled pandas in)."""
    code = (
        "import sys, batchrunner.cli, batchrunner.engine\n"
        "print(sorted(m for m in ('pandas', 'jsonschema') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "[]"


def test_a_local_endpoint_starts_the_simulator_only_when_asked() -> None:
    async def main() -> tuple[str, str]:
        async with local.endpoint(True) as (url, key):
            assert "batchrunner.gateway" in sys.modules
            return url, key

    url, key = asyncio.run(main())
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url.rstrip("/")), url
    assert key.startswith("sk-ru-local-")


def test_a_remote_endpoint_needs_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RU_LLM_API_KEY", raising=False)

    async def main() -> None:
        async with local.endpoint(False, "http://127.0.0.1:9/v1", None):
            pass

    with pytest.raises(UsageError):
        asyncio.run(main())


def test_no_module_imports_the_package_init() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*from \.+ import (__version__|__all__)", line) or re.match(
                r"\s*(from batchrunner import|import batchrunner\s*$)", line
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []
