"""The README's Python examples run as written (from the repository root)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    code = _python_blocks()[index].replace("/tmp/", str(tmp_path) + "/")
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_readme_has_examples():
    assert _python_blocks()
