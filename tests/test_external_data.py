"""External data read safely, a model and its data replaced together, temporaries cleaned, output paths checked."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import onnx
import pytest

from graphprune import external_data, model_io, tempfiles
from graphprune.cli import main
from graphprune.errors import UserError
from graphprune.model_io import load, model_files, save
from graphprune.runtime import make_session, run
from tests.helpers import conv_model

FEEDS = {"x": np.ones((2, 3, 8, 8), np.float32)}
HOUR_AGO = time.time() - 2 * tempfiles.STALE_SECONDS


def _outputs(model):
    return run(make_session(model), FEEDS)["y"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line naming the problem
    return err[0]


def _snapshot(folder):
    """{relative path: bytes} of every regular file under ``folder`` (links listed, not followed)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[rel] = f.read()
            else:
                found[rel] = "special"
    return found


def _age(path, when=HOUR_AGO):
    """Backdate ``path`` (and, for a folder, its entries) as a killed run's leftover."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.utime(os.path.join(path, name), (when, when))
    os.utime(path, (when, when))


# -- reading: locations confined to the model's folder, sizes checked ------------------------------

@pytest.fixture
def layout(tmp_path):
    """tmp/m/m.onnx whose weight "w" (432 bytes) lives in w.bin; tmp/outside/secret.bin outside its folder."""
    folder, outside = tmp_path / "m", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    path = save(conv_model(width=4), folder / "m.onnx")  # all inline: the records are written below
    model = onnx.load(path)
    w = next(t for t in model.graph.initializer if t.name == "w")
    raw = w.raw_data
    (folder / "w.bin").write_bytes(raw)
    (outside / "secret.bin").write_bytes(b"S" * len(raw))
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(len(raw)))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, path)
    return folder, outside, path


def _relocate(path, location=None, length=None, offset=None):
    model = onnx.load(path, load_external_data=False)
    w = next(t for t in model.graph.initializer if t.name == "w")
    for entry in w.external_data:
        if entry.key == "location" and location is not None:
            entry.value = location
        if entry.key == "length" and length is not None:
            entry.value = str(length)
        if entry.key == "offset" and offset is not None:
            entry.value = str(offset)
    onnx.save_model(model, path)


def test_external_data_inside_the_folder_loads(layout):
    folder, _, path = layout
    reference = _outputs(conv_model(width=4))
    np.testing.assert_array_equal(_outputs(load(path)), reference)
    (folder / "data").mkdir()
    os.rename(folder / "w.bin", folder / "data" / "w.bin")
    _relocate(path, location="data/w.bin")
    np.testing.assert_array_equal(_outputs(load(path)), reference)
    # a symlink that stays inside passes the confinement check; onnx itself then reads through no symlink
    os.symlink("data", folder / "sub")
    _relocate(path, location="sub/w.bin")
    assert external_data.check_external_data(load(path, load_external_data=False), path) == [
        os.path.realpath(folder / "data" / "w.bin")
    ]
    with pytest.raises(UserError, match="cannot read its external data"):
        load(path)


def _escape_file_symlink(folder, outside, path):
    os.remove(folder / "w.bin")
    os.symlink(outside / "secret.bin", folder / "w.bin")


def _escape_dir_symlink(folder, outside, path):
    os.symlink(outside, folder / "sub")
    _relocate(path, location="sub/secret.bin")


def _dotdot(folder, outside, path):
    _relocate(path, location="../outside/secret.bin")


def _absolute(folder, outside, path):
    _relocate(path, location=str(outside / "secret.bin"))


def _fifo(folder, outside, path):
    os.remove(folder / "w.bin")
    os.mkfifo(folder / "w.bin")  # reading it would hang


def _truncated(folder, outside, path):
    with open(folder / "w.bin", "r+b") as f:
        f.truncate(100)


def _offset_past_the_end(folder, outside, path):
    _relocate(path, offset=10_000)


def _wrong_length(folder, outside, path):
    _relocate(path, length=400)


def _missing(folder, outside, path):
    os.remove(folder / "w.bin")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_escape_file_symlink, "resolves outside the model's folder"),
        (_escape_dir_symlink, "resolves outside the model's folder"),
        (_dotdot, "holds '..'"),
        (_absolute, "is an absolute path"),
        (_fifo, "is a FIFO, not a regular file"),
        (_truncated, "but the file holds 100 (truncated?)"),
        (_offset_past_the_end, "offset 10000 past the end of the file"),
        (_wrong_length, "has length 400, but dims [4, 3, 3, 3] need 432 bytes"),
        (_missing, "does not exist beside the model"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "",
)
def test_unsafe_external_data_exits_2_in_one_line_and_writes_nothing(layout, capsys, damage, message):
    folder, outside, path = layout
    damage(folder, outside, path)
    before = _snapshot(folder.parent)
    out = folder.parent / "out.onnx"
    assert main(["prune", path, "-o", str(out), "--ratio", "0.5"]) == 2
    line = _error_line(capsys)
    assert message in line and "tensor 'w'" in line and path in line
    assert not out.exists() and _snapshot(folder.parent) == before
    assert main(["inspect", path]) == 2  # also when the weights are not read
    assert message in _error_line(capsys)


def test_load_checks_before_reading(layout):
    folder, outside, path = layout
    _escape_dir_symlink(folder, outside, path)
    with pytest.raises(UserError, match="resolves outside"):
        load(path, load_external_data=False)


# -- writing: a model and its data switch together -------------------------------------------------

def test_rewrites_alternate_data_names_and_leave_one_pair(tmp_path):
    out = str(tmp_path / "out.onnx")
    for seed, data_name in ((0, "out.onnx.data"), (1, "out.onnx.1.data"), (2, "out.onnx.data")):
        model = conv_model(width=32, seed=seed)
        save(model, out, external_data=True)
        assert sorted(os.listdir(tmp_path)) == sorted(["out.onnx", data_name])
        assert model_files(out) == [out, os.path.join(str(tmp_path), data_name)]
        np.testing.assert_array_equal(_outputs(load(out)), _outputs(model))
    save(conv_model(seed=3), out)  # inline over a pair: the old data file goes
    assert os.listdir(tmp_path) == ["out.onnx"]


def test_failed_switch_keeps_the_old_pair(tmp_path, monkeypatch):
    out = str(tmp_path / "out.onnx")
    old = conv_model(width=32, seed=0)
    save(old, out, external_data=True)
    before = _snapshot(tmp_path)
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):  # the data file lands, the model's rename fails
        calls.append(dst)
        if len(calls) > 1:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        save(conv_model(width=32, seed=1), out, external_data=True)
    monkeypatch.undo()
    assert calls[0].endswith("out.onnx.1.data")
    assert _snapshot(tmp_path) == before  # no new data file, no hidden folder
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(old))


_KILLED_WRITE = textwrap.dedent(
    """
    import os, sys
    from graphprune.model_io import save
    from tests.helpers import conv_model

    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):
            os._exit(9)  # as SIGKILL: no finally, no atexit
        real_replace(src, dst)

    os.replace = replace
    save(conv_model(width=32, seed=1), sys.argv[1], external_data=True)
    """
)


@pytest.mark.parametrize("killed_at", [1, 2], ids=["before-data-rename", "between-renames"])
def test_a_killed_write_leaves_a_consistent_pair_and_the_next_write_cleans_up(tmp_path, killed_at):
    out = str(tmp_path / "out.onnx")
    old = conv_model(width=32, seed=0)
    save(old, out, external_data=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITE, out, str(killed_at)], cwd=root, timeout=120)
    assert done.returncode == 9
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(old))  # the old pair, whole
    leftovers = sorted(n for n in os.listdir(tmp_path) if n not in ("out.onnx", "out.onnx.data"))
    hidden = [n for n in leftovers if n.startswith(tempfiles.HIDDEN_PREFIX)]
    assert len(hidden) == 1 and leftovers == sorted(hidden + (["out.onnx.1.data"] if killed_at == 2 else []))
    _age(str(tmp_path / hidden[0]))
    new = conv_model(width=32, seed=2)
    save(new, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.2.data" if killed_at == 2 else "out.onnx.1.data"]
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(new))


_SIGTERMED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from graphprune.model_io import save
    from tests.helpers import conv_model

    real_replace = os.replace

    def replace(src, dst):  # SIGTERM arrives between the data file's rename and the model's
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)

    os.replace = replace
    save(conv_model(width=32, seed=1), sys.argv[1], external_data=True)
    """
)


def test_sigterm_during_a_library_write_removes_its_temporaries(tmp_path):
    out = str(tmp_path / "out.onnx")
    old = conv_model(width=32, seed=0)
    save(old, out, external_data=True)
    before = _snapshot(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _SIGTERMED_WRITE, out], cwd=root, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM
    assert _snapshot(tmp_path) == before  # no hidden folder, no new data file
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(old))


def test_a_write_killed_after_the_switch_leaves_the_new_pair(tmp_path, monkeypatch):
    out = str(tmp_path / "out.onnx")
    save(conv_model(width=32, seed=0), out, external_data=True)
    monkeypatch.setattr(model_io, "_remove_old_data", lambda *args, **kwargs: None)  # killed before step 4
    new = conv_model(width=32, seed=1)
    save(new, out, external_data=True)
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(new))
    monkeypatch.undo()
    save(new, out, external_data=True)  # both names taken: a third, then both old ones go
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.2.data"]


def test_overwriting_the_input_replaces_its_data_and_other_inputs_data_is_kept(tmp_path):
    path = str(tmp_path / "m.onnx")
    save(conv_model(width=32, seed=0), path, external_data=True)
    new = conv_model(width=32, seed=1)
    save(new, path, input_path=path, overwrite_input=True, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data"]
    np.testing.assert_array_equal(_outputs(load(path)), _outputs(new))
    # an input whose data file is named like the output's: never removed
    other = str(tmp_path / "x.onnx")
    os.rename(path, other)
    save(new, tmp_path / "m.onnx", input_path=other, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.1.data", "m.onnx.data", "x.onnx"]
    np.testing.assert_array_equal(_outputs(load(other)), _outputs(new))


def test_weights_left_on_disk_are_streamed_into_the_new_data_file(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    model = conv_model(width=32)
    path = save(model, source / "m.onnx", external_data=True)
    lazy = load(path, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in lazy.graph.initializer)
    out = save(lazy, tmp_path / "out.onnx", input_path=path)
    assert sorted(os.listdir(tmp_path)) == ["in", "out.onnx", "out.onnx.data"]
    np.testing.assert_array_equal(_outputs(load(out)), _outputs(model))


def test_large_tensors_are_page_aligned(tmp_path):
    model = conv_model(width=4)
    big = onnx.numpy_helper.from_array(np.ones((300, 300), np.float32), "big")  # unused by the graph
    model.graph.initializer.extend([big])
    path = save(model, tmp_path / "m.onnx", external_data=True)
    stored = {t.name: {e.key: e.value for e in t.external_data}
              for t in onnx.load(path, load_external_data=False).graph.initializer if t.external_data}
    assert int(stored["big"]["offset"]) % 4096 == 0
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(load(path).graph.initializer[-1]), np.ones((300, 300)))


# -- temporaries: removed on signals, and at the next run after a kill ------------------------------

def test_stale_leftovers_are_cleaned_and_fresh_ones_kept(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    stale = ["graphprune-prep-a", "graphprune-calib-b", "pre.quant.c", "graphprune-run-999999999-d"]
    fresh = ["graphprune-prep-e", f"graphprune-run-{os.getpid()}-f", "unrelated-g"]
    for name in stale + fresh:
        (temp / name).mkdir()
        (temp / name / "model.onnx").write_bytes(b"x" * 10)
    for name in stale[:3] + ["unrelated-g"]:
        _age(str(temp / name))
    assert tempfiles.clean_temp_dir(str(temp)) == 4
    assert sorted(os.listdir(temp)) == sorted(fresh)
    (tmp_path / ".graphprune-old").mkdir()
    (tmp_path / ".graphprune-old" / "out.onnx").write_bytes(b"x")
    _age(str(tmp_path / ".graphprune-old"))
    (tmp_path / ".graphprune-new").mkdir()
    assert tempfiles.clean_beside(str(tmp_path)) == 1
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".")) == [".graphprune-new"]


def test_a_cli_run_cleans_the_temp_dir_and_leaves_nothing_there(tmp_path, monkeypatch, capsys):
    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / "pre.quant.old").mkdir()
    _age(str(temp / "pre.quant.old"))
    (temp / "graphprune-run-999999999-x").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    path = save(conv_model(), tmp_path / "m.onnx")
    assert main(["run", path, "-o", str(tmp_path / "out.onnx"), "--pass", "canonicalize"]) == 0
    assert os.listdir(temp) == [] and tempfile.tempdir == str(temp)


_SIGTERMED_RUN = textwrap.dedent(
    """
    import os, signal, sys, tempfile, time
    from graphprune import tempfiles

    with tempfiles.run_scope() as private:
        assert tempfile.gettempdir() == private
        tempfile.mkdtemp(prefix="graphprune-prep-")  # inside the private folder
        hidden = tempfiles.track(tempfile.mkdtemp(prefix=".graphprune-", dir=sys.argv[1]))
        print(private, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """
)


def test_sigterm_removes_the_temporaries(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _SIGTERMED_RUN, str(tmp_path)], cwd=root, timeout=60,
                          capture_output=True, text=True)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    private = done.stdout.strip()
    assert private and not os.path.exists(private)
    assert os.listdir(tmp_path) == []


# -- output paths: checked before any work ----------------------------------------------------------

@pytest.fixture
def run_files(tmp_path):
    """A model with external data, an .npz, a teacher, a recipe, and an existing folder."""
    model = save(conv_model(width=32), tmp_path / "m.onnx", external_data=True)
    teacher = save(conv_model(width=32, seed=1), tmp_path / "t.onnx")
    data = str(tmp_path / "d.npz")
    np.savez(data, x=np.ones((4, 3, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes:\n  - canonicalize: {}\n")
    (tmp_path / "folder").mkdir()
    model_copy = str(tmp_path / "copy.onnx")  # refers to m.onnx.data, as m.onnx does
    shutil.copyfile(model, model_copy)
    return {"model_copy": model_copy, "model": model, "teacher": teacher, "data": data, "recipe": str(recipe), "dir": str(tmp_path / "folder"),
            "model_data": model + ".data", "out": str(tmp_path / "out.onnx")}


CLASHES = [
    ("prune {model} -o {model} --ratio 0.5", "refusing to overwrite the input model"),
    ("prune {model} -o {model_data} --ratio 0.5", "-o {model_data}: is the input model's external data"),
    ("prune {model_copy} -o {model} --ratio 0.5", "-o {model}: its data file m.onnx.data is the input model's external"),
    ("prune {model} -o {dir} --ratio 0.5", "is a directory"),
    ("run {model} -o {data} --pass canonicalize --data {data}", "is the --data file of this run"),
    ("run {model} -o {recipe} --recipe {recipe}", "is the --recipe file of this run"),
    ("finetune {model} -o {teacher} --data {data} --teacher {teacher}", "is the --teacher model of this run"),
    ("finetune {model} -o {data} --data {data} --labels labels", "is the --data file of this run"),
    ("quantize {model} -o {out} --data {data} --report {data}", "--report {data}: is the same file as the --data file"),
    ("quantize {model} -o {out} --report {out}", "is the same file as the output model (-o)"),
    ("sparsify {model} -o {out} --sparsity 0.5 --report {out}.data", "is a data file of the output model"),
    ("sparsify {model} -o {out} --sparsity 0.5 --report {dir}", "--report {dir}: is a directory"),
    ("sparsify {model} -o {out} --sparsity 0.5 --report {model}", "is the same file as the input model"),
    ("validate {model} {teacher} --report {teacher}", "is the same file as the candidate model"),
]


@pytest.mark.parametrize("command, message", CLASHES, ids=[c.split()[0] + "-" + m[:30] for c, m in CLASHES])
def test_output_path_clashes_exit_2_and_change_nothing(run_files, tmp_path, capsys, command, message):
    before = _snapshot(tmp_path)
    assert main(command.format(**run_files).split()) == 2
    assert message.format(**run_files) in _error_line(capsys)
    assert _snapshot(tmp_path) == before


def test_an_unwritable_report_folder_fails_before_the_model_is_written(run_files, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # root ignores permissions: refuse as a read-only mount would
        if dir is not None and os.path.samefile(dir, locked):
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    try:
        for command in ("sparsify {model} -o {out} --sparsity 0.5", "quantize {model} -o {out} --no-measure"):
            argv = command.format(**run_files).split() + ["--report", str(locked / "r.json")]
            assert main(argv) == 2
            assert "cannot write in" in _error_line(capsys)
            assert not os.path.exists(run_files["out"])
    finally:
        os.chmod(locked, 0o700)


def test_reports_and_models_written_atomically_leave_no_temporaries(run_files, tmp_path, capsys):
    out, report = run_files["out"], str(tmp_path / "r.json")
    assert main(["sparsify", run_files["model"], "-o", out, "--sparsity", "0.5", "--report", report]) == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(tempfiles.HIDDEN_PREFIX)]
    assert os.path.getsize(report) > 0 and load(out).graph.initializer


def test_a_missing_input_with_an_existing_output_is_named(run_files, tmp_path, capsys):
    missing = str(tmp_path / "missing.onnx")
    assert main(["prune", missing, "-o", run_files["model"], "--ratio", "0.5"]) == 2
    assert "no such file" in _error_line(capsys)


def test_a_run_cleans_killed_runs_leftovers_beside_its_output_even_when_it_fails(run_files, tmp_path, capsys):
    stale = tmp_path / ".graphprune-killed"
    stale.mkdir()
    (stale / "out.onnx.data").write_bytes(b"x" * 100)
    _age(str(stale))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert main(["prune", str(garbage), "-o", run_files["out"], "--ratio", "0.5"]) == 2  # fails after the path checks
    assert "not an ONNX model" in _error_line(capsys)
    assert not stale.exists() and not os.path.exists(run_files["out"])

