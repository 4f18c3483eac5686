"""Progress bars (tqdm) that stay silent in tests and when not asked for."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

from tqdm import tqdm

__all__ = ["progress_bar"]


@contextlib.contextmanager
def progress_bar(total: Optional[int], desc: str, enabled: bool = True, unit: str = "it") -> Iterator[tqdm]:
    """A tqdm bar on stderr; disabled (but still usable as an object) when ``enabled`` is false.

    The bar only appears after half a second (``delay``) so quick steps print nothing.
    """
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, delay=0.5, leave=False)
    try:
        yield bar
    finally:
        bar.close()
