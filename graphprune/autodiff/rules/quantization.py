"""Gradient rules: quantization (being written)."""
