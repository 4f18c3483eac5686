"""Gradient rules: spatial (being written)."""
