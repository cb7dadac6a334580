"""Rows in: readers (files, buckets), row to request, row hashes."""
