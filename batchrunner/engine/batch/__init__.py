"""`--engine batch`: the run's rows sent through the provider's Batch API (`dispatcher.py`)."""

from batchrunner.engine.batch.dispatcher import BatchDispatcher, batch_dispatcher

__all__ = ["BatchDispatcher", "batch_dispatcher"]
