"""The Ray engine (docs/ray.md): the same job, its blocks processed by actors on a Ray cluster.

Installed with the `ray` extra. Only `engine.arun` reaches here, when `config.engine` is
"ray"; this package drives the engine and is never imported by it at module level.
"""

from __future__ import annotations

from batchrunner.engine.ray.driver import RayDispatcher, arun_on_ray

__all__ = ["RayDispatcher", "arun_on_ray"]
