"""`batchrunner cancel OUTPUT`: the output's pending Batch API batches cancelled.

The batches the ledger lists as submitted and not collected are cancelled at the gateway
(`POST /batches/{id}/cancel`). What they finished before the cancel is kept: the next run of
the same command collects it, and sends the rows they never answered in a new batch. Nothing
is written here (a run may hold the checkpoint): the ledger is the run's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchrunner.config.settings import resolve_api_key, resolve_base_url
from batchrunner.errors import UsageError
from batchrunner.store.batches import Ledger
from batchrunner.store.layout import checkpoint_dir
from batchrunner.transport.batch_api import BatchApi
from batchrunner.transport.client import Client

__all__ = ["cancel_batches"]


async def cancel_batches(
    output: Path, *, base_url: str | None = None, api_key_env: str | None = None
) -> list[dict[str, Any]]:
    """Cancel `output`'s pending batches; each one's id and status after the request."""
    directory = checkpoint_dir(output)
    if not directory.is_dir():
        raise UsageError(f"{output}: no checkpoint found at {directory}")
    ledger = Ledger.open(directory)
    pending = [entry for entry in ledger.batches if entry.pending]
    if not pending:
        return []
    url = resolve_base_url(base_url or ledger.base_url)
    key = resolve_api_key(api_key_env)
    cancelled = []
    async with Client(url, key, concurrency=1, timeout=60) as client:
        api = BatchApi(client)
        for entry in pending:
            assert entry.batch_id is not None
            batch = await api.cancel(entry.batch_id)
            counts = batch.get("request_counts") or {}
            cancelled.append({"batch_id": entry.batch_id, "status": batch.get("status"),
                              "completed": counts.get("completed", 0),
                              "failed": counts.get("failed", 0),
                              "total": counts.get("total", entry.rows)})
    return cancelled
