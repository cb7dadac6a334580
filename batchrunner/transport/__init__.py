"""Talking to the gateway: one HTTP attempt, retries, pacing, limits."""
