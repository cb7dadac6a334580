"""The run: setup, the dispatcher seam and its dispatchers, one row, the recorder."""
