"""Gradient rules: normalization (being written)."""
