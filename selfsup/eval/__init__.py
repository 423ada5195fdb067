"""Evaluation on frozen features (kNN, linear probe), baselines and collapse diagnostics."""
from selfsup.eval.diagnostics import alignment, batch_diagnostics, effective_rank, energy_gap, spread, uniformity
from selfsup.eval.evaluate import evaluate_run, format_table, load_run
from selfsup.eval.features import extract_features, pixel_features
from selfsup.eval.knn import knn_accuracy, knn_predict
from selfsup.eval.linear import linear_probe

__all__ = ["alignment", "batch_diagnostics", "effective_rank", "energy_gap", "spread", "uniformity", "evaluate_run",
           "format_table", "load_run", "extract_features", "pixel_features", "knn_accuracy", "knn_predict",
           "linear_probe"]
