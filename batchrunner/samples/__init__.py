"""Sample prompts, an evaluation set and job files, shipped inside the package.

`batchrunner samples DIR` writes them into DIR, so that a user who installed batchrunner
(no checkout, no key, no network) can try it: `cd DIR && batchrunner run job.toml`.

The two data files are byte copies of the repository's `sample_data/prompts.jsonl` and
`sample_data/eval_multiple_choice.jsonl`: `sample_data/make_samples.py` writes both places and
the tests check that the copies are the same.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import UsageError

__all__ = ["SAMPLE_FILES", "write_samples"]

SAMPLE_FILES = ("README.md", "job.toml", "eval.toml", "prompts.jsonl", "eval_multiple_choice.jsonl")
"""What `batchrunner samples` writes, in the order it lists them."""


def write_samples(folder: Path | str, *, force: bool = False) -> list[Path]:
    """Write the samples into `folder` (created if need be); the paths written.

    A file already there with the same content is left as it is; one with other content is
    a UsageError (nothing is written) unless `force`, which replaces it.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder")
    source = resources.files(__name__)
    contents = {name: source.joinpath(name).read_bytes() for name in SAMPLE_FILES}
    targets = {name: folder / name for name in SAMPLE_FILES}
    if not force:
        for name, target in targets.items():
            if target.is_dir() or (target.exists() and target.read_bytes() != contents[name]):
                raise UsageError(f"{target} already exists and differs from the sample "
                                 f"(--force replaces it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, target in targets.items():
            if not (target.is_file() and target.read_bytes() == contents[name]):
                target.write_bytes(contents[name])
    except OSError as exc:
        raise UsageError(f"cannot write the samples to {folder}: "
                         f"{exc.strerror or exc}") from None
    return list(targets.values())
