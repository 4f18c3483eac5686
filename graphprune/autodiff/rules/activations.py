"""Gradient rules: activations (being written)."""
