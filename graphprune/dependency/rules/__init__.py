"""Per-op pruning rules, registered by op type; importing this package registers them all.

Families: ``conv`` (ops with weights), ``norm`` (normalizations, softmax), ``elementwise``
(activations, broadcasting arithmetic), ``layout`` (reshape/flatten/transpose/squeeze),
``shape_ops`` (concat/split/slice/expand/pad/shape...),
``pooling`` (pools, resize, reductions); for transformers ``attention`` (heads, head dims, GQA),
``layernorm`` (the hidden size), ``embedding`` (Gather), ``fused`` (ORT's com.microsoft ops).
"""

from graphprune.dependency.rules.registry import (
    ROLES,
    MissingShape,
    Rule,
    RuleContext,
    register_rule,
    registered_ops,
    rule_for,
)
from graphprune.dependency.rules import conv, elementwise, layout, norm, pooling, shape_ops  # noqa: F401,E402
from graphprune.dependency.rules import attention, embedding, fused, layernorm  # noqa: F401,E402

__all__ = ["ROLES", "MissingShape", "Rule", "RuleContext", "register_rule", "registered_ops", "rule_for"]
