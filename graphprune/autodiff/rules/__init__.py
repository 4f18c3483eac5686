"""Vector-Jacobian rules by op family; importing this package registers all of them."""

from graphprune.autodiff.rules import (  # noqa: F401
    activations,
    arithmetic,
    einsum,
    gather,
    linear,
    normalization,
    quantization,
    reduction,
    shape_ops,
    spatial,
)
