"""Vector-Jacobian rules by op family; importing this package registers all of them."""

from graphprune.autodiff.rules import (  # noqa: F401
    activations,
    arithmetic,
    conv,
    einsum,
    gather,
    linear,
    normalization,
    pooling,
    quantization,
    reduction,
    resample,
    shape_ops,
)
