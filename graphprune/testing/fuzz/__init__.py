"""Seeded generator of malformed (and odd but valid) inputs for the command line, in families.

Each ``FuzzCase`` is a set of files to write into an empty folder and a ``graphprune`` argument list
naming them through ``{d}`` (the folder); ``expect`` says what a correct CLI does with it:
``"error"`` (exit 2, one line naming the problem), ``"ok"`` (exit 0 and a valid output) or ``"any"``
(either).  Cases marked ``isolate`` crashed the whole process once (SIGFPE, SIGSEGV): tests run
them in a subprocess.  ``tests/test_fuzz.py`` runs the cases; ``cases(seed)`` is deterministic.

Families:
  - ``model_bytes``: truncated, bit-flipped, empty, garbage or non-ONNX model files;
  - ``structure``: defects built with ``onnx.helper`` (Conv stride 0, negative pads, group not dividing
    the channels, opset 99, negative or zero dims, conflicting value_info, NaN/Inf weights, raw data of
    the wrong length, dangling inputs, malformed mask metadata...);
  - ``npz``: bad sample files (zero samples, NaN/Inf, wrong rank or dims, a ``.npy`` as ``.npz``,
    labels of the wrong rank) and odd good ones (scalar and integer inputs);
  - ``recipe``: bad recipe files (``round_to: 1.5``, a FIFO, an oversized file, bad YAML) and ``--pass`` specs;
  - ``args``: out-of-range numeric options (``--threads`` huge, ratios NaN...);
  - ``output``: odd output paths (a directory, a missing folder, the input itself, a data file of the run).
"""

from graphprune.testing.fuzz.case import FAMILIES, FuzzCase
from graphprune.testing.fuzz.families import cases, fast_subset
from graphprune.testing.fuzz.models import conv_model, scalar_input_model
from graphprune.testing.fuzz.runner import Outcome, run_case

__all__ = ["FAMILIES", "FuzzCase", "Outcome", "cases", "conv_model", "fast_subset", "run_case", "scalar_input_model"]
