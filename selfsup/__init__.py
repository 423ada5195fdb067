"""selfsup: self-supervised pretraining, evaluation and diagnostics for image encoders.

The parts, each importable on its own:

- ``selfsup.data``     datasets as uint8 image sets (image folders cached on disk), splits, label subsets
- ``selfsup.views``    batched augmentation on the training device, view recipes
- ``selfsup.nn``       backbones, the MLP head builder, EMA teachers, memory queues
- ``selfsup.losses``   pure loss functions, by family
- ``selfsup.methods``  one registered ``nn.Module`` per method
- ``selfsup.train``    the loop, schedules, optimisers, checkpoints, distributed helpers
- ``selfsup.eval``     kNN, linear probe, baselines, diagnostics
"""
__version__ = "0.1.0"

from selfsup import data, losses, methods, nn, views  # noqa: E402
from selfsup.config import ConfigError, RunConfig, load_config  # noqa: E402
from selfsup.eval.evaluate import evaluate_run  # noqa: E402
from selfsup.methods import METHODS  # noqa: E402
from selfsup.train.loop import pretrain  # noqa: E402

__all__ = ["data", "losses", "methods", "nn", "views", "ConfigError", "RunConfig", "load_config", "evaluate_run",
           "METHODS", "pretrain", "__version__"]
