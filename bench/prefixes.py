"""The speed of `prefix_key` (batchrunner/inputs/prefixes.py), which `--order prefix` runs on
every row of an input (10,000,000 rows is a target the project keeps).

From the repository root (the project's venv is enough):

    PYTHONPATH=$PWD python bench/prefixes.py            # 1,000,000 bodies of each kind
    PYTHONPATH=$PWD python bench/prefixes.py --rows 100000

Two kinds of body: document QA (a system message, a 5,200-character document shared by the
rows of its group, then the row's question: a key over 1,024 estimated tokens) and short
prompts (no key: under 1,024 tokens). Prints bodies per second and the number of keys.
"""

from __future__ import annotations

import argparse
import random
import time

from batchrunner.inputs.prefixes import prefix_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta"]
    docs = [" ".join(rng.choice(words) for _ in range(1300)) for _ in range(200)]
    system = {"role": "system", "content": "Answer from the document."}
    doc_qa = [{"model": "gpt-4o-mini",
               "messages": [system, {"role": "user", "content": docs[i % len(docs)]},
                            {"role": "user", "content": f"Question {i}?"}]}
              for i in range(rows)]
    short = [{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {i}?"}]}
             for i in range(rows)]
    print("| bodies | kind | seconds | bodies/s | keys |")
    print("|---:|---|---:|---:|---:|")
    for name, bodies in (("document QA (about 1,600 tokens)", doc_qa), ("short prompts", short)):
        started = time.perf_counter()
        keys = [prefix_key(body) for body in bodies]
        took = time.perf_counter() - started
        print(f"| {rows:,} | {name} | {took:.2f} | {rows / took:,.0f} | "
              f"{len({k for k in keys if k is not None}):,} |")


if __name__ == "__main__":
    main()
