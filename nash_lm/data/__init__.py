"""Data sources. `synthetic` holds the deterministic synthetic sources used by tests and the tiny pipeline."""
