"""Transformer analysis: heads, FFN neurons and the hidden size found as groups of their kind on the
BERT/GPT fixtures, with the coupling each kind needs (and the reasons when it is blocked)."""

import numpy as np
import pytest

from graphprune.dependency import AnalysisOptions, build_dependency_graph, reported_groups
from graphprune.dependency.rules.layernorm import HIDDEN_BLOCKED
from graphprune.testing import transformer_corpus


def _groups(name, **options):
    model = transformer_corpus()[name]()
    return reported_groups(build_dependency_graph(model, options=AnalysisOptions(**options)).groups())


def _by_kind(groups, kind):
    return [g for g in groups if g.kind == kind]


def _member(group, tensor, axis):
    return next(m for m in group.members if m.dim.tensor == tensor and m.dim.axis == axis)


@pytest.mark.parametrize("name", ["bert_encoder", "bert_encoder_decomposed_ln", "gpt_decoder"])
def test_every_layer_has_a_prunable_heads_group_and_ffn_group(name):
    groups = _groups(name)
    heads, ffn = _by_kind(groups, "heads"), _by_kind(groups, "ffn")
    assert [g.channels for g in heads] == [4, 4]
    assert [g.channels for g in ffn] == [256, 256]
    assert all(g.prunable for g in heads + ffn)


def test_a_head_is_a_block_of_head_dim_features_of_q_k_v_and_rows_of_the_output_projection():
    heads = _by_kind(_groups("bert_encoder"), "heads")[0]
    prefix = "encoder.layer.0.attention"
    for tensor, axis in [(f"{prefix}.self.query.weight", 1), (f"{prefix}.self.key.weight", 1),
                         (f"{prefix}.self.value.weight", 1), (f"{prefix}.output.dense.weight", 0)]:
        m = _member(heads, tensor, axis)
        assert np.array_equal(m.atoms, np.repeat(np.arange(4), 16)), tensor  # 64 features = 4 heads x 16


def test_hidden_size_is_one_group_blocked_by_layernorm_unless_asked():
    for name in ("bert_encoder", "bert_encoder_decomposed_ln", "gpt_decoder"):
        hidden = _by_kind(_groups(name), "hidden")
        assert len(hidden) == 1 and hidden[0].channels == 64
        assert any(HIDDEN_BLOCKED in r for r in hidden[0].reasons)
    asked = _by_kind(_groups("gpt_decoder", hidden=True), "hidden")[0]
    assert not any(HIDDEN_BLOCKED in r for r in asked.reasons)
    assert asked.prunable  # the LM head consumes the stream; logits keep their vocab axis
    assert "model.embed_tokens.weight" in asked.param_names()


def test_head_dim_option_couples_q_and_k_dims_and_keeps_heads():
    groups = _groups("bert_encoder", head_dim=True)
    assert not _by_kind(groups, "heads")
    dims = _by_kind(groups, "head_dim")
    assert all(g.prunable and g.channels == 16 for g in dims)
    qk = next(g for g in dims if "encoder.layer.0.attention.self.query.weight" in g.param_names())
    assert "encoder.layer.0.attention.self.key.weight" in qk.param_names()
    m = _member(qk, "encoder.layer.0.attention.self.query.weight", 1)
    assert np.array_equal(m.atoms, np.tile(np.arange(16), 4))  # dim j of every head


def test_grouped_query_attention_prunes_a_kv_head_with_its_query_group():
    heads = _by_kind(_groups("gpt_decoder_gqa_swiglu"), "heads")
    assert [g.channels for g in heads] == [2, 2] and all(g.prunable for g in heads)
    attn = "model.layers.0.self_attn"
    g = heads[0]
    assert np.array_equal(_member(g, f"{attn}.k_proj.weight", 1).atoms, np.repeat(np.arange(2), 16))
    # 4 query heads, 2 per KV head: query head h belongs to KV head h // 2
    assert np.array_equal(_member(g, f"{attn}.q_proj.weight", 1).atoms, np.repeat(np.arange(2), 32))
    assert np.array_equal(_member(g, f"{attn}.o_proj.weight", 0).atoms, np.repeat(np.arange(2), 32))
