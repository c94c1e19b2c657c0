"""Honest cross-slide evaluation of encoder tables (``cytostore evaluate``).

Splits are by group (slide) with duplicate groups merged (``splits``), the probes are pure
numpy/scikit-learn (``probes``), the output is a table, JSON, Markdown or PNG (``report``).
"""

from cytostore.evaluate.run import EvalConfig, evaluate, labelled_tables
from cytostore.evaluate.splits import (grouped_folds, merge_duplicate_groups,
                                       sample_cross_group_episodes)

__all__ = ["EvalConfig", "evaluate", "labelled_tables", "grouped_folds", "merge_duplicate_groups",
           "sample_cross_group_episodes"]
