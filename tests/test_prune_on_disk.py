"""prune leaves an external-data model's weights on disk (read one at a time, untouched ones copied file
to file) and writes exactly what the same model pruned in memory writes."""

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphprune import model_io
from graphprune.cli import main
from graphprune.errors import UserError
from graphprune import weights_on_disk as on_disk


def _stack(seed: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Conv -> Relu -> MatMul -> Add -> Relu -> MatMul: every weight of
    1 KiB or more (the BatchNorm's and one bias stay inline: below the threshold)."""
    rng = np.random.default_rng(seed)

    def t(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [t("w1", 32, 3, 3, 3), t("b1", 32), t("s", 32), t("bias", 32), t("mean", 32),
             numpy_helper.from_array(rng.uniform(0.5, 2, 32).astype(np.float32), "var"),
             t("w2", 16, 32, 3, 3), t("m1", 1024, 64), t("a1", 64), t("m2", 64, 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "bias", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "a1"], ["ha"], name="fc1_bias"),
        helper.make_node("Relu", ["ha"], ["hr"], name="relu3"),
        helper.make_node("MatMul", ["hr", "m2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _files(folder) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


@pytest.fixture
def pair(tmp_path):
    """The same model twice: weights in a data file (on_disk/) and inline (in_memory/)."""
    for name, external in (("on_disk", True), ("in_memory", False)):
        (tmp_path / name).mkdir()
        model_io.save(_stack(), tmp_path / name / "m.onnx", external_data=external)
        (tmp_path / f"{name}_out").mkdir()
    assert os.path.exists(tmp_path / "on_disk" / "m.onnx.data")
    assert not os.path.exists(tmp_path / "in_memory" / "m.onnx.data")
    return tmp_path


def _prune(folder, *extra) -> dict:
    assert main(["prune", str(folder.parent / folder.name.replace("_out", "") / "m.onnx"), "-o", str(folder / "p.onnx"),
                 "--ratio", "0.5", *extra]) == 0
    return _files(folder)


def _reads(monkeypatch) -> list:
    """Names of the weights read from disk one at a time (the on-disk path ran)."""
    names = []
    original = on_disk.read_tensor
    monkeypatch.setattr(on_disk, "read_tensor", lambda t, d: names.append(t.name) or original(t, d))
    return names


@pytest.mark.parametrize("extra", [(), ("--global",), ("--criterion", "l1", "--round-to", "4"), ("--mode", "mask"),
                                   ("--criterion", "activation", "--data", "DATA")])
def test_weights_on_disk_give_the_in_memory_result_byte_for_byte(pair, monkeypatch, extra):
    if "DATA" in extra:  # calibration samples for the activation criterion: its session maps the weights
        np.savez(pair / "x.npz", x=np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32))
        extra = tuple(str(pair / "x.npz") if e == "DATA" else e for e in extra)
    reads = _reads(monkeypatch)
    on = _prune(pair / "on_disk_out", *extra)
    assert {"w1", "w2", "m1", "m2"} <= set(reads)  # scored and sliced from the data file
    assert not reads.count("w1") > 3  # the finite check, the score, the slice: never all loaded at once
    reads.clear()
    memory = _prune(pair / "in_memory_out", *extra)
    assert not reads  # the inline model: nothing read from disk
    assert on == memory and list(on) == ["p.onnx"]  # small result: inline, as in memory


def test_large_result_streams_untouched_weights_byte_for_byte(pair, monkeypatch):
    # a result past the inline limit (faked small) is written with a data file; the weights the prune
    # left untouched (m2's rows stay; m2 is read, sliced on axis 0) come from the input's data file
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    on = _prune(pair / "on_disk_out")
    memory = _prune(pair / "in_memory_out")
    assert list(on) == ["p.onnx", "p.onnx.data"]
    assert on == memory
    model = model_io.load(pair / "on_disk_out" / "p.onnx")
    assert list(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "m1")).shape) == [512, 32]


def test_unprunable_model_copies_its_records(tmp_path, monkeypatch):
    # ratio 0: nothing pruned, every weight stays a record until written (copied through)
    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1024)
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0"]) == 0
    a, b = model_io.load(tmp_path / "m.onnx"), model_io.load(tmp_path / "p.onnx")
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))


def test_nan_on_disk_refused_as_in_memory(tmp_path, capsys):
    model = _stack()
    bad = numpy_helper.to_array(model.graph.initializer[7]).copy()
    bad[3, 5] = np.nan
    model.graph.initializer[7].CopyFrom(numpy_helper.from_array(bad, "m1"))
    model_io.save(model, tmp_path / "m.onnx", external_data=True)
    (tmp_path / "inline").mkdir()
    model_io.save(model, tmp_path / "inline" / "m.onnx", external_data=False)  # the door's in-memory check
    messages = []
    for folder, mode in ((tmp_path, "remove"), (tmp_path, "mask"), (tmp_path / "inline", "remove")):
        assert main(["prune", str(folder / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                     "--mode", mode]) == 2
        messages.append(capsys.readouterr().err.strip().replace(str(folder), "DIR"))
    assert "'m1' holds NaN or Inf" in messages[0] and messages[0] == messages[1] == messages[2]
    assert not os.path.exists(tmp_path / "p.onnx")


def test_symlinked_data_file_refused_as_in_memory(tmp_path, capsys):
    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    os.rename(tmp_path / "m.onnx.data", tmp_path / "real.data")
    os.symlink("real.data", tmp_path / "m.onnx.data")  # inside the folder: onnx reads through no symlink
    messages = []
    for mode in ("remove", "mask"):
        assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                     "--mode", mode]) == 2
        messages.append(capsys.readouterr().err.strip())
    assert "reached through a symlink" in messages[0] and messages[0] == messages[1]
    with pytest.raises(UserError) as loaded:  # what reading the data at load says
        model_io.load(tmp_path / "m.onnx")
    assert messages[0].endswith(str(loaded.value))


def test_symlink_refused_while_the_records_are_checked(tmp_path, monkeypatch):
    """``load(direct_paths=True)``: refused in the records' one walk, before the door's checks and
    without reading any data (no second load)."""
    from graphprune import external_data

    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    os.rename(tmp_path / "m.onnx.data", tmp_path / "real.data")
    os.symlink("real.data", tmp_path / "m.onnx.data")
    assert model_io.load(tmp_path / "m.onnx", load_external_data=False).graph.node  # as before without the flag
    monkeypatch.setattr(external_data, "_read_external", lambda *a: pytest.fail("data read"))
    monkeypatch.setattr(external_data, "check_direct_paths", lambda *a: pytest.fail("a second walk"))
    with pytest.raises(external_data.SymlinkedData, match="'m.onnx.data' is reached through a symlink"):
        model_io.load(tmp_path / "m.onnx", load_external_data=False, direct_paths=True)
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 2


@pytest.mark.parametrize("ratio", ["0", "0.5"])
def test_result_check_rereads_no_weight_the_door_found_finite(tmp_path, monkeypatch, ratio):
    """The untouched weights read in before the write are the bytes the door read and found finite:
    the result's finite check reads only what the prune wrote and what the door checked in memory."""
    from graphprune import validation

    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    inline = {i.name for i in model_io.load(tmp_path / "m.onnx", load_external_data=False).graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    read = []
    original = validation._all_finite
    monkeypatch.setattr(validation, "_all_finite", lambda t: (t.data_location != onnx.TensorProto.EXTERNAL
                                                              and read.append(t.name)) or original(t))
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.onnx"), "--ratio", ratio]) == 0
    door, result = read[: len(inline)], read[len(inline):]
    assert set(door) == inline  # the door's in-memory check; its records were read one by one
    sliced = {"w1", "w2", "m1", "m2"} if ratio == "0.5" else set()
    assert set(result) == inline | sliced  # not one untouched record again


def test_records_outside_the_initializers_are_read_as_before(tmp_path, monkeypatch):
    # a Constant node's tensor stored in the data file: the whole model is read as before
    model = _stack()
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == "m1")
    m1 = model.graph.initializer[index]
    model.graph.node.insert(0, helper.make_node("Constant", [], ["m1"], value=m1))
    del model.graph.initializer[index]
    for name, external in (("on_disk", True), ("in_memory", False)):
        (tmp_path / name).mkdir()
        onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), str(tmp_path / name / "m.onnx"),
                        save_as_external_data=external,
                        location="m.onnx.data", size_threshold=1024, convert_attribute=True)
        (tmp_path / f"{name}_out").mkdir()
    assert os.path.exists(tmp_path / "on_disk" / "m.onnx.data")
    reads = _reads(monkeypatch)
    on, memory = _prune(tmp_path / "on_disk_out"), _prune(tmp_path / "in_memory_out")
    assert not reads and on == memory


def test_files_kept_open_read_the_same_values_and_report_a_short_file(tmp_path):
    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    model = model_io.load(tmp_path / "m.onnx", load_external_data=False)
    records = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    alone = [on_disk.read_tensor(t, str(tmp_path)) for t in records]
    with on_disk.files_kept_open():
        with on_disk.files_kept_open():  # nested: the outer block keeps the descriptor
            kept = [on_disk.read_tensor(t, str(tmp_path)) for t in records]
        assert len(on_disk._OPEN_FILES) == 1  # one descriptor for the one data file
        kept[0][...] = 0  # writable, not a view of anything shared
        os.truncate(tmp_path / "m.onnx.data", 100)
        with pytest.raises(UserError, match="ends early"):
            on_disk.read_tensor(records[-1], str(tmp_path))
    assert on_disk._OPEN_FILES is None
    for a, b in zip(alone[1:], kept[1:]):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_files_kept_open_keeps_small_tensors_read_only(tmp_path, monkeypatch):
    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    model = model_io.load(tmp_path / "m.onnx", load_external_data=False)
    small, large = (next(t for t in model.graph.initializer if t.name == n) for n in ("w2", "m1"))  # 18 KiB, 256 KiB
    with on_disk.files_kept_open(keep_below=100_000):
        first = on_disk.read_tensor(small, str(tmp_path))
        reads, preadv = [], os.preadv
        monkeypatch.setattr(on_disk.os, "preadv", lambda *a: reads.append(1) or preadv(*a))
        again = on_disk.read_tensor(small, str(tmp_path))
        assert not reads and np.shares_memory(first, again) and not again.flags.writeable
        copy = onnx.TensorProto()
        copy.CopyFrom(small)  # another object holding the same record: kept (the key is the record)
        assert np.shares_memory(first, on_disk.read_tensor(copy, str(tmp_path))) and not reads
        offset = next(e for e in copy.external_data if e.key == "offset")
        offset.value = str(int(offset.value) + 4)
        moved = on_disk.read_tensor(copy, str(tmp_path))  # another span: read, not the kept value
        assert len(reads) == 1 and not np.shares_memory(first, moved)
        np.testing.assert_array_equal(moved.reshape(-1)[:-1], first.reshape(-1)[1:])
        reads.clear()
        on_disk.read_tensor(large, str(tmp_path))
        on_disk.read_tensor(large, str(tmp_path))
        assert len(reads) == 2  # above the limit: read each time
    assert on_disk.read_tensor(small, str(tmp_path)).flags.writeable  # outside the block: a fresh copy


def test_read_kept_reads_runs_at_once_and_hands_out_what_read_tensor_would(tmp_path, monkeypatch):
    """Records back to back in one file are read with one read each run; the values, types and
    shapes are ``read_tensor``'s, kept (read-only) for later reads; a record too large to keep, one
    of another file and a file cut short are read (or refused) one by one, as ``read_tensor`` does."""
    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    model = model_io.load(tmp_path / "m.onnx", load_external_data=False)
    records = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    alone = [on_disk.read_tensor(t, str(tmp_path)) for t in records]
    reads, pread = [], os.pread
    monkeypatch.setattr(on_disk.os, "pread", lambda *a: reads.append(a[1]) or pread(*a))
    with on_disk.files_kept_open(keep_below=100_000):  # m1 (256 KiB) is read alone
        values = list(on_disk.read_kept(records, str(tmp_path)))
        assert len(reads) < len(records) - 1 and [r.name for r in records].index("m1") > 0
        for record, a, b in zip(records, alone, values):
            assert a.dtype == b.dtype and a.shape == b.shape and (b.flags.writeable == (record.name == "m1"))
            np.testing.assert_array_equal(a, b)
        assert np.shares_memory(values[0], on_disk.read_tensor(records[0], str(tmp_path)))  # kept
    with on_disk.files_kept_open(keep_below=100_000):
        os.truncate(tmp_path / "m.onnx.data", 2000)  # w1 (3.4 KiB) is the first record
        with pytest.raises(UserError, match="external data of 'w1' ends early"):
            list(on_disk.read_kept(records, str(tmp_path)))


def test_prune_lets_go_of_each_kept_weight_once_sliced(tmp_path):
    """The door's read of the small weights is kept for the scoring (``files_kept_open``); the pass
    drops each one as its pruned form is made, not when the command ends: the input's weights and
    the result's are never all in memory together.  Those it did not slice stay kept."""
    import weakref

    from graphprune.passes.prune_channels import PruneChannelsPass

    model_io.save(_stack(), tmp_path / "m.onnx", external_data=True)
    model = model_io.load(tmp_path / "m.onnx", load_external_data=False)
    records = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    with on_disk.files_kept_open(keep_below=2**20):
        before = {r.name: v.copy() for r, v in zip(records, on_disk.read_kept(records, str(tmp_path)))}
        kept = {r.name: weakref.ref(on_disk.read_tensor(r, str(tmp_path)).base) for r in records}
        result = PruneChannelsPass(ratio=0.5, source_dir=str(tmp_path))(model)
        shapes = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
        sliced = {r.name for r in records if shapes.get(r.name) != tuple(r.dims)}
        assert result.modified and {"w1", "w2", "m1"} <= sliced
        assert all(kept[name]() is None for name in sliced)
        assert all(kept[name]() is not None for name in set(kept) - sliced)
        for r in records:  # asked again, a dropped weight is read again, same values
            np.testing.assert_array_equal(on_disk.read_tensor(r, str(tmp_path)), before[r.name])
