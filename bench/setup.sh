#!/usr/bin/env bash
# Create the benchmark's own virtualenv, bench/.venv: batchrunner (editable) and the peers the
# benchmark compares it with (openai, litellm), plus matplotlib for the curve and py-spy for
# profiles. None of these become dependencies of the package. Safe to run again.
#
#     bash bench/setup.sh            # then: bench/.venv/bin/python bench/run.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -e "$root"
"${pip[@]}" openai matplotlib
# uvloop speeds up bench/fastgate.py, the benchmark's own server (not the clients).
"${pip[@]}" uvloop || echo "setup: uvloop did not install; fastgate uses asyncio" >&2
# py-spy is optional: profiles only.
"${pip[@]}" py-spy || echo "setup: py-spy did not install; profiles will use cProfile" >&2
# litellm is heavy and pins many things: the harness works without it (marked "not installed").
if ! "${pip[@]}" litellm; then
    echo "setup: litellm did not install; the peers section will mark it 'not installed'" >&2
fi
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("batchrunner", "openai", "litellm", "matplotlib", "aiohttp", "pyarrow"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
PY
echo "setup: ready: $venv/bin/python $here/run.py"
