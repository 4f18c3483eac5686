"""Sensitivity analysis: prune each group (kind, stage) alone at several ratios and measure the damage,
MACs, params and latency; the numbers budgets (``prune --target-macs``) allocate per-group ratios from."""

from graphprune.sensitivity.budget_prune import BudgetResult, prune_to_budget
from graphprune.sensitivity.run import DEFAULT_RATIOS, sensitivity

__all__ = ["sensitivity", "DEFAULT_RATIOS", "prune_to_budget", "BudgetResult"]
