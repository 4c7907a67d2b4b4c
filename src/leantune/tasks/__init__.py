"""Data, formatting and metrics per task family."""
