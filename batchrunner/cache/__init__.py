"""The response cache: answers kept across runs and outputs."""
