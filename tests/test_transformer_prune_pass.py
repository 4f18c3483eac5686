"""The prune pass on transformers: per-kind ratios, masked == removed for heads and FFN neurons,
any batch and sequence length after removal, head-dim and hidden-size pruning, calibration data."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.data import InputSet
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run
from graphprune.testing import transformer_corpus

CORPUS = transformer_corpus()
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        _MODELS[name] = CORPUS[name]()
    return _MODELS[name]


def _tokens(batch, seq, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 100, size=(batch, seq)).astype(np.int64)}


def _outputs(model, feeds):
    return run(make_session(model), feeds)


def _dims(model):
    return {i.name: list(i.dims) for i in model.graph.initializer}


def _assert_close(a, b, rtol=1e-4, atol=1e-4):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_heads_and_ffn_masked_equals_removed_at_any_batch_and_length(name):
    model = _model(name)
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, ffn_ratio=0.5)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, ffn_ratio=0.5, mode="mask")(model)
    kinds = removed.stats["kinds"]
    assert kinds["heads"]["removed"] == kinds["heads"]["channels"] // 2
    assert kinds["ffn"]["removed"] == kinds["ffn"]["channels"] // 2
    assert removed.stats["params_after"] < 0.8 * removed.stats["params_before"]
    for batch, seq in ((2, 7), (1, 1), (3, 33)):
        feeds = _tokens(batch, seq)
        out = _outputs(removed.model, feeds)
        _assert_close(out, _outputs(masked.model, feeds))
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in _outputs(model, feeds).items()}


def test_removing_heads_rewrites_the_reshape_constants_and_shrinks_each_projection():
    result = PruneChannelsPass(ratio=0.0, heads_ratio=0.5)(_model("bert_encoder"))
    dims = _dims(result.model)
    attn = "encoder.layer.0.attention"
    assert dims[f"{attn}.self.query.weight"] == [64, 32] and dims[f"{attn}.self.value.bias"] == [32]
    assert dims[f"{attn}.output.dense.weight"] == [32, 64]
    assert dims["encoder.layer.0.intermediate.dense.weight"] == [64, 256]  # ffn ratio 0 overrides nothing: ratio 0
    targets = []
    for node in result.model.graph.node:
        if node.op_type == "Reshape":
            target = next(i for i in result.model.graph.initializer if i.name == node.input[1])
            targets.append(onnx.numpy_helper.to_array(target).tolist())
    assert [0, 0, 2, 16] in targets and [0, 0, 32] in targets
    assert [0, 0, 4, 16] not in targets and [0, 0, 64] not in targets


def test_grouped_query_attention_rewrites_concat_built_targets():
    model = _model("gpt_decoder_gqa_swiglu")
    result = PruneChannelsPass(ratio=0.0, heads_ratio=0.5)(model)
    dims = _dims(result.model)
    attn = "model.layers.0.self_attn"
    assert dims[f"{attn}.k_proj.weight"] == [64, 16] and dims[f"{attn}.q_proj.weight"] == [64, 32]
    assert dims[f"{attn}.o_proj.weight"] == [32, 64]
    _outputs(result.model, _tokens(2, 9))


def test_ratio_zero_is_a_no_op_with_identical_outputs():
    model = _model("gpt_decoder")
    result = PruneChannelsPass(ratio=0.0)(model)
    assert not result.modified and result.model is model
    assert result.stats["note"] == "ratio 0: nothing to prune"


def test_ratio_applies_to_heads_and_ffn_unless_overridden():
    result = PruneChannelsPass(ratio=0.5, ffn_ratio=0.25)(_model("bert_encoder"))
    kinds = result.stats["kinds"]
    assert kinds["heads"]["removed"] == 4 and kinds["ffn"]["removed"] == 128 and kinds["channels"]["removed"] == 32


def test_a_heads_ratio_of_one_keeps_one_head_per_layer_and_says_so():
    result = PruneChannelsPass(ratio=0.0, heads_ratio=1.0)(_model("gpt_decoder"))
    assert result.stats["kinds"]["heads"]["removed"] == 6  # 2 layers x (4 - 1)
    assert result.stats["notes"] == ["heads ratio 1 would remove every head of 2 attention layer(s): kept 1 head in each"]
    assert _dims(result.model)["model.layers.1.self_attn.q_proj.weight"] == [64, 16]
    _outputs(result.model, _tokens(2, 4))


@pytest.mark.parametrize("bad, message", [
    ({"heads_ratio": 1.5}, "heads ratio 1.5 is outside [0, 1]"),
    ({"ffn_ratio": 1.0}, "ffn ratio 1.0 is outside [0, 1)"),
    ({"hidden_ratio": "x"}, "hidden ratio 'x' is not a number"),
])
def test_bad_kind_ratios_are_refused(bad, message):
    from graphprune.errors import UserError

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)").replace("]", r"\]")):
        PruneChannelsPass(ratio=0.0, **bad)


def test_head_dim_pruning_keeps_the_head_count_and_masked_equals_removed():
    model = _model("bert_encoder")
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, head_dim=True)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, head_dim=True, mode="mask")(model)
    assert "heads" not in removed.stats["kinds"] and removed.stats["kinds"]["head_dim"]["removed"] == 2 * 2 * 8  # (Q.K, V.O) x 2 layers x half of 16
    dims = _dims(removed.model)
    assert dims["encoder.layer.0.attention.self.query.weight"] == [64, 32]
    shapes = [onnx.numpy_helper.to_array(i).tolist() for i in removed.model.graph.initializer if i.data_type == 7]
    assert [0, 0, 4, 8] in shapes  # still 4 heads, of 8 dims
    feeds = _tokens(2, 6)
    _assert_close(_outputs(removed.model, feeds), _outputs(masked.model, feeds))


def test_hidden_size_is_pruned_only_when_asked_and_is_lossy():
    model = _model("gpt_decoder")
    assert "hidden" not in PruneChannelsPass(ratio=0.5)(model).stats["kinds"]
    removed = PruneChannelsPass(ratio=0.0, hidden_ratio=0.25)(model)
    assert removed.stats["kinds"]["hidden"]["removed"] == 16
    assert any("lossy" in n for n in removed.stats["notes"])
    dims = _dims(removed.model)
    assert dims["model.embed_tokens.weight"] == [100, 48] and dims["lm_head.weight"] == [48, 100]
    assert dims["model.layers.0.input_layernorm.weight"] == [48]
    feeds = _tokens(2, 5)
    out = _outputs(removed.model, feeds)["logits"]
    assert out.shape == (2, 5, 100) and np.isfinite(out).all()


def test_activation_importance_ranks_heads_on_calibration_data():
    from graphprune.dependency import build_dependency_graph, reported_groups
    from graphprune.pruning import activation_stats, group_scores

    model = _model("bert_encoder")
    data = InputSet({"input_ids": np.random.default_rng(3).integers(0, 100, size=(8, 12)).astype(np.int64)})
    dep = build_dependency_graph(model)
    heads = [g for g in reported_groups(dep.groups()) if g.kind == "heads"]
    stats = activation_stats(model, [m.dim for g in heads for m in g.members], data)
    assert any(d.tensor.endswith("Softmax_output_0") and d.axis == 1 for d in stats)  # per-head attention maps
    scores = group_scores(dep, heads, "activation", stats)
    assert all(len(scores[g.id]) == 4 and np.all(scores[g.id] > 0) and np.ptp(scores[g.id]) > 0 for g in heads)
    result = PruneChannelsPass(ratio=0.0, heads_ratio=0.5, criterion="activation", data=data)(model)
    assert result.stats["kinds"]["heads"]["removed"] == 4
    _outputs(result.model, _tokens(2, 5))


@settings(max_examples=6, deadline=None)
@given(heads=st.floats(0.0, 1.0), ffn=st.floats(0.0, 0.95), seq=st.integers(1, 20))
def test_any_heads_and_ffn_ratio_keeps_outputs_and_masked_equals_removed(heads, ffn, seq):
    model = _model("gpt_decoder_gqa_swiglu")
    removed = PruneChannelsPass(ratio=0.0, heads_ratio=heads, ffn_ratio=ffn)(model)
    masked = PruneChannelsPass(ratio=0.0, heads_ratio=heads, ffn_ratio=ffn, mode="mask")(model)
    assert removed.stats["kinds"]["heads"]["removed"] <= 2  # one KV group of each layer stays
    feeds = _tokens(1, seq)
    _assert_close(_outputs(removed.model, feeds), _outputs(masked.model, feeds))


@settings(max_examples=5, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([2, 4]), ffn=st.sampled_from([4, 12]),
       ratio=st.floats(0.1, 0.9), decomposed=st.booleans(), per_head_dims=st.booleans())
def test_random_small_encoders_prune_consistently(heads, head_dim, ffn, ratio, decomposed, per_head_dims):
    from graphprune.testing import bert_encoder

    model = bert_encoder(layers=1, hidden=heads * head_dim, heads=heads, ffn=ffn, vocab=20, max_positions=16,
                         decomposed_layernorm=decomposed)
    kwargs = dict(ratio=ratio, head_dim=per_head_dims)
    removed = PruneChannelsPass(**kwargs)(model)
    masked = PruneChannelsPass(mode="mask", **kwargs)(model)
    kinds = removed.stats["kinds"]
    assert kinds["ffn"]["removed"] == int(ffn * ratio + 1e-9)
    if heads > 1 and not per_head_dims:
        assert kinds["heads"]["removed"] == min(int(heads * ratio + 1e-9), heads - 1)
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 20, size=(2, 5)).astype(np.int64)}
    _assert_close(_outputs(removed.model, feeds), _outputs(masked.model, feeds))
