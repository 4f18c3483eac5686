"""Shared test set-up: debug checks on (every pass output gets the full checker)."""

import os

os.environ.setdefault("GRAPHPRUNE_DEBUG", "1")
