"""The package version, apart from `__init__` so that any module may read it cheaply."""

from __future__ import annotations

__version__ = "0.1.0"
