"""``result_check.result_check``: a result is checked (attributes, full checker, finite weights, an ORT
session built on a thread) before ``model_io.save`` commits it; the full check within
``shapes.sharing_inference`` serializes one weightless copy that the session check reuses."""

import os
import threading

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import helper

from graphprune import ir, shapes
from graphprune.errors import UserError
from graphprune.model_io import check_model, save
from graphprune.passes.base import PassContractError
from graphprune.testing import fuzz
from graphprune.testing.fuzz import defects
from graphprune.result_check import result_check


def _erf_branch(parts):
    """A double Erf beside the convs: the checker accepts it, ORT has no kernel for it."""
    parts["nodes"].append(helper.make_node("Erf", ["d"], ["e"], name="erf"))
    parts["inputs"].append(helper.make_tensor_value_info("d", onnx.TensorProto.DOUBLE, [1, 4]))
    parts["outputs"].append(helper.make_tensor_value_info("e", onnx.TensorProto.DOUBLE, [1, 4]))


def _no_session_thread_left() -> bool:
    return not any(t.name == "graphprune-session-check" for t in threading.enumerate())


@pytest.mark.parametrize("sharing", [False, True], ids=["alone", "sharing"])
def test_a_result_the_runtime_refuses_is_never_committed(tmp_path, sharing):
    out = tmp_path / "out.onnx"
    save(fuzz.conv_model(), out)
    before = out.read_bytes()
    bad = fuzz.conv_model(edit=_erf_branch)
    with shapes.sharing_inference() if sharing else _nothing():
        with pytest.raises(UserError, match="onnxruntime cannot load the model: .*Erf"):
            with result_check(bad) as verdict:
                save(bad, out, before_commit=verdict)  # written to its temporary place, then refused
    assert out.read_bytes() == before  # the previous file is untouched
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]  # and nothing new is left beside it
    assert _no_session_thread_left()


def test_a_valid_result_is_written_and_loads(tmp_path):
    out = tmp_path / "out.onnx"
    model = fuzz.conv_model()
    with shapes.sharing_inference(), result_check(model) as verdict:
        save(model, out, before_commit=verdict)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 3, 8, 8), np.float32)})[0].shape == (2, 10)
    assert _no_session_thread_left()


@pytest.mark.parametrize("edit, expected", [
    (defects.set_attr("conv1", "strides", [0, 1]), "strides [0, 1] must all be >= 1"),  # before any inference
    (defects.conflicting_type, "invalid ONNX graph: "),
])
def test_an_invalid_result_is_our_bug_not_a_crash(edit, expected):
    with shapes.sharing_inference(), pytest.raises(PassContractError, match="refusing to write an invalid result") as info:
        with result_check(fuzz.conv_model(edit=edit)):
            pytest.fail("the block runs only for a valid result")
    assert expected in str(info.value)
    assert _no_session_thread_left()


def test_non_finite_result_weights_are_refused_before_the_block():
    with pytest.raises(UserError, match="result weight 'c2.w' holds NaN or Inf"):
        with result_check(fuzz.conv_model(edit=defects.replace_init("c2.w", defects.nan_weight(float("nan"))))):
            pytest.fail("the block runs only for a finite result")
    assert _no_session_thread_left()


def test_the_session_check_reuses_the_full_checks_file(monkeypatch):
    from graphprune.model_io import ort_limits

    ort_limits()  # its probe sessions (made once per process) are not the check's
    model = fuzz.conv_model()
    written = []
    real_write = ir.write_weightless_bytes
    monkeypatch.setattr(ir, "write_weightless_bytes", lambda *a, **k: written.append(a) or real_write(*a, **k))
    monkeypatch.setattr(ir, "write_weightless", lambda *a, **k: pytest.fail("written again"))
    opened = []
    real_session = onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, *a, **k: opened.append(path) or real_session(path, *a, **k))
    with shapes.sharing_inference():
        with result_check(model):
            pass
        path = shapes.checked_file(model)
        assert path is not None and opened == [path], opened  # the runtime read the file the checker read
        assert len(written) == 1  # one serialization of the weightless copy for both
    assert not os.path.exists(path)  # the sharing block's folder goes with it


def _typed_weight(parts):
    """c2.w stored in float_data (the typed field) with one value missing."""
    old = next(t for t in parts["inits"] if t.name == "c2.w")
    short = onnx.TensorProto(name="c2.w", data_type=onnx.TensorProto.FLOAT, dims=list(old.dims))
    short.float_data.extend([0.5] * (int(np.prod(old.dims)) - 1))
    parts["inits"][parts["inits"].index(old)] = short


def test_weights_a_weightless_copy_leaves_out_are_still_checked():
    """The whole-model checker refuses a tensor whose value field is short; so does the full check
    within sharing_inference, which reads a weightless copy of every model."""
    model = fuzz.conv_model(edit=_typed_weight)
    with pytest.raises(UserError, match="float_data size") as whole:
        check_model(model, full=True)
    with shapes.sharing_inference(), pytest.raises(UserError) as shared:
        check_model(model, full=True)
    assert str(shared.value) == str(whole.value)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("shared", [True, False])
def test_a_thread_reuses_the_memory_the_main_thread_freed(shared):
    """``runtime.share_malloc_arena``: after it, a thread's allocations come from the main heap,
    where 64 MB just freed are waiting (glibc gives each thread a fresh arena otherwise: the
    negative control, where the thread's 64 MB are new memory)."""
    import subprocess
    import sys

    script = (
        "import sys, threading, numpy as np\n"
        "from graphprune.runtime import share_malloc_arena\n"
        "assert sys.argv[1] == '0' or share_malloc_arena()\n"
        "def rss():\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "kept = [np.ones(2048, np.float32) for _ in range(8192)]\n"
        # Held above the freed arrays: free() returns the top of the heap to the system at once,
        # and whether the freed block ends at the top depends on what was allocated before.
        "pin = np.ones(2048, np.float32)\n"
        "del kept\n"
        "before = rss()\n"
        "out = []\n"
        "thread = threading.Thread(target=lambda: out.append([np.ones(2048, np.float32) for _ in range(8192)]))\n"
        "thread.start(); thread.join()\n"
        "print(rss() - before)\n"
    )
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc arenas")
    run = subprocess.run([sys.executable, "-c", script, "1" if shared else "0"], capture_output=True, text=True,
                         check=True)
    grown = int(run.stdout)
    if shared:
        assert grown < 16 * 2**20  # the thread's 64 MB of arrays came from the freed memory
    else:
        assert grown > 48 * 2**20
