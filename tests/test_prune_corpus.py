"""The corpus oracle: on real architectures, removed == masked at ratios 0.25 and 0.5, and every
pruned model passes the full checker (GRAPHPRUNE_DEBUG) and runs in ORT with unchanged outputs."""

import pytest

from graphprune.data import random_inputs
from graphprune.passes import PruneChannelsPass
from graphprune.runtime import make_session, run
from graphprune.testing.fixtures import fixture_corpus
from graphprune.testing.zoo import load_light_model
from graphprune.validate import compare_outputs

# the light corpus (VGG-19/AlexNet/ZFNet are the same ops at 5-20x the size)
LIGHT = ["resnet50", "shufflenet", "densenet121", "inception_v1", "inception_v2", "squeezenet"]
# groups besides the image channels and the class scores that must stay: inception v1's LRNs
EXTRA_BLOCKED = {"inception_v1": 4}


def check_masked_equals_removed(model, feed, ratios=(0.25, 0.5)):
    """Prune at each ratio in both modes; returns the remove-mode stats of the last ratio."""
    reference = run(make_session(model), feed)
    stats = None
    for ratio in ratios:
        removed = PruneChannelsPass(ratio=ratio)(model)
        masked = PruneChannelsPass(ratio=ratio, mode="mask")(model)
        assert removed.modified and masked.modified
        out_removed = run(make_session(removed.model), feed)
        out_masked = run(make_session(masked.model), feed)
        for name, ref in reference.items():
            assert out_removed[name].shape == ref.shape
            error = compare_outputs(name, out_masked[name], out_removed[name]).rel_l2
            assert error <= 1e-4, f"ratio {ratio}: {name} masked vs removed rel L2 {error}"
        assert removed.stats["params_after"] < removed.stats["params_before"]
        stats = removed.stats
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("name", LIGHT)
def test_light_models_masked_equals_removed(name):
    model = load_light_model(name)
    feed = random_inputs(model, seed=1).first_batch(1)
    stats = check_masked_equals_removed(model, feed)
    # only the image channels and the class scores are pinned (and what LRN mixes)
    blocked = 2 + EXTRA_BLOCKED.get(name, 0)
    assert stats["groups_blocked"] == blocked and stats["groups_prunable"] == stats["groups_found"] - blocked
    assert stats["groups_pruned"] > 0


def _feed(model, batch=2, spatial=32):
    """Seeded inputs; symbolic dims get ``batch`` (N) or ``spatial`` (H, W...)."""
    shapes = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = tuple(d.dim_value if d.dim_value > 0 else (batch if i == 0 else spatial) for i, d in enumerate(dims))
    return random_inputs(model, shapes, seed=2).first_batch(batch)


@pytest.mark.parametrize("name", sorted(fixture_corpus()))
def test_fixtures_masked_equals_removed(name):
    model = fixture_corpus()[name]()
    stats = check_masked_equals_removed(model, _feed(model))
    assert stats["groups_pruned"] == stats["groups_prunable"] > 0


def test_dynamic_dims_stay_dynamic_and_other_sizes_run():
    model = fixture_corpus()["dynamic_resnet"]()
    pruned = PruneChannelsPass(ratio=0.5)(model).model
    dims = [d.dim_param for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim] and dims[0]
    session = make_session(pruned)
    for batch, spatial in ((1, 32), (3, 48)):
        feed = _feed(model, batch, spatial)
        assert run(session, feed)["output"].shape[0] == batch
