"""Evaluation: per-sample predictions, the paper's accuracy tables (Table 2 per
meta-category, Table 3 general model vs the ensembles routed by the top-1 rule and by
probability mass) and confusions."""

from .ensemble import (
    Specialist,
    calibrate_threshold,
    combine,
    in_global_classes,
    route,
    route_by_mass,
    table3,
    within_category,
)
from .metrics import (
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    AccuracyRow,
    AccuracyTable,
    accuracy_table,
    confused_pairs,
    per_class_accuracy,
    top_k_accuracy,
)
from .predictions import Predictions
from .table3_text import table3_markdown, verdict

__all__ = [
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "PAPER_TABLE4",
    "AccuracyRow",
    "AccuracyTable",
    "Predictions",
    "Specialist",
    "accuracy_table",
    "calibrate_threshold",
    "combine",
    "confused_pairs",
    "in_global_classes",
    "per_class_accuracy",
    "route",
    "route_by_mass",
    "table3",
    "table3_markdown",
    "top_k_accuracy",
    "verdict",
    "within_category",
]
