"""What training and evaluation both measure: collapse diagnostics and warnings, frozen features, kNN.

The layer between the parts (data, views, nn) and the two users of it (``train``, ``eval``): the
training loop's collapse monitor and online kNN, and evaluation's protocols, read the same code.
"""
from selfsup.monitor.collapse import CollapseMonitor
from selfsup.monitor.diagnostics import alignment, batch_diagnostics, effective_rank, energy_gap, spread, uniformity
from selfsup.monitor.features import extract_features, pixel_features
from selfsup.monitor.knn import knn_accuracy, knn_predict

__all__ = ["CollapseMonitor", "alignment", "batch_diagnostics", "effective_rank", "energy_gap", "spread",
           "uniformity", "extract_features", "pixel_features", "knn_accuracy", "knn_predict"]
