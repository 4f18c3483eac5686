"""Shared test set-up: debug checks on (every pass output gets the full checker)."""

import os

from hypothesis import settings

os.environ.setdefault("GRAPHPRUNE_DEBUG", "1")

# Property tests draw the same examples on every run: CI never fails on an example a developer's run
# did not see (set HYPOTHESIS_PROFILE=explore to search new ones).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
