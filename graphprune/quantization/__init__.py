"""Post-training int8 quantization in QDQ format: calibration, placement rules, cost model, error budget.

The pass that ties these together is ``graphprune.passes.insert_qdq.InsertQDQPass`` (``quantize``).
"""

from graphprune.quantization.calibration import as_feeds, calibrate, calibration_feeds
from graphprune.quantization.config import ACTIVATION_TYPES, METHODS, QuantConfig
from graphprune.quantization.cost import NodeCost, Placement, estimate_costs, place
from graphprune.quantization.engine import insert_qdq_nodes
from graphprune.quantization.prepare import QUANTIZED_OP_TYPES, is_quantized, prepare
from graphprune.quantization.rules import RULES, Rule, eligible_nodes

__all__ = [
    "QuantConfig",
    "METHODS",
    "ACTIVATION_TYPES",
    "as_feeds",
    "calibrate",
    "calibration_feeds",
    "NodeCost",
    "Placement",
    "estimate_costs",
    "place",
    "insert_qdq_nodes",
    "QUANTIZED_OP_TYPES",
    "is_quantized",
    "prepare",
    "RULES",
    "Rule",
    "eligible_nodes",
]
