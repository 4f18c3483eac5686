"""Gradient rules: shape_ops (being written)."""
