"""Per-op pruning rules, registered by op type; importing this package registers them all.

Families: ``conv`` (ops with weights), ``norm`` (normalizations, softmax), ``elementwise``
(activations, broadcasting arithmetic), ``shape_ops`` (concat/split/slice/reshape/transpose...),
``pooling`` (pools, resize, reductions).
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
from graphprune.dependency.rules import conv, elementwise, norm, pooling, shape_ops  # noqa: F401,E402

__all__ = ["ROLES", "MissingShape", "Rule", "RuleContext", "register_rule", "registered_ops", "rule_for"]
