"""Evaluation of a run's encoder: kNN and linear probe on frozen features, fine-tuning, baselines, and the
encoder's uses (embeddings, neighbours, export). Frozen features and kNN live in :mod:`selfsup.monitor`."""
from selfsup.eval.evaluate import evaluate_run, format_table
from selfsup.eval.linear import linear_probe

__all__ = ["evaluate_run", "format_table", "linear_probe"]
