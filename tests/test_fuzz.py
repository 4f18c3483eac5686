"""The fuzz suite: malformed inputs through the command line end in exit 2 with one line, or a valid output.

``graphprune.testing.fuzz`` generates the cases from a seed.  For every case: exit 2 with exactly one
stderr line (ORT's own log lines included: stderr is captured at the file-descriptor level), or exit 0
with an output that passes the full checker, holds finite weights and opens in onnxruntime; never
exit 1, a traceback, a signal or a hang; nothing written on failure; the input files unchanged.

The fast subset (about 60 cases) runs in ``make test``; the whole set is marked ``fuzz``:
``.venv/bin/python -m pytest tests/test_fuzz.py -m fuzz``.
"""

import pytest

from graphprune.testing import fuzz

_FAST = fuzz.fast_subset(seed=0)
_ALL = fuzz.cases(seed=0)


def _check(case, tmp_path):
    outcome = fuzz.run_case(case, str(tmp_path), timeout=120)
    assert not outcome.problems, f"{case.id}: exit {outcome.code}: {outcome.problems} | stderr: {outcome.stderr[-600:]}"


@pytest.mark.parametrize("case", _FAST, ids=[c.id for c in _FAST])
def test_fuzz_fast_subset(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.fuzz
@pytest.mark.parametrize("case", _ALL, ids=[c.id for c in _ALL])
def test_fuzz_all(case, tmp_path):
    _check(case, tmp_path)


def test_generator_is_seeded_and_covers_every_family():
    again = fuzz.cases(seed=0)
    assert [c.id for c in again] == [c.id for c in _ALL]
    assert [c.files for c in again] == [c.files for c in _ALL]
    assert {c.family for c in _ALL} == set(fuzz.FAMILIES)
    assert {c.family for c in _FAST} == set(fuzz.FAMILIES)
    assert len(_ALL) >= 300 and 50 <= len(_FAST) <= 70
