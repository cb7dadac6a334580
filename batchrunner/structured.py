"""Where `flatten` lived before the package had sub-packages: `batchrunner.flatten` now.

Kept so that scripts written as `from batchrunner.structured import flatten` still run.
"""

from __future__ import annotations

from batchrunner.answers.flatten import flatten

__all__ = ["flatten"]
