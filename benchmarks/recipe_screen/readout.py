"""Which read-out of a trained small CNN probes best? The encoder's weights stay as trained; only how its last
maps become the embedding changes. Scored on the run's held-out images (as ``screen_val.sh``), never the test set.

    python benchmarks/recipe_screen/readout.py RUN THREADS gap,flat,gap+max,gap+prev2x2,flat+gap

- ``gap``: global average pool of the last map (``pool_grid: 1``); ``flat``: the last map kept whole (at 28 px it
  is 2×2, so ``pool_grid: 2``); ``gap+max``: average and max pools; ``gap+prev2x2``: the average pool beside the
  previous stage's map pooled to 2×2; ``flat+gap``: both.
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from selfsup.data import load_dataset
from selfsup.eval.evaluate import _heldout_split, evaluate_features
from selfsup.monitor.features import extract_features
from selfsup.nn.backbones import SmallResNet
from selfsup.train.rundir import load_run


class ReadOut(nn.Module):
    def __init__(self, net: SmallResNet, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        x = self.net.stem(x)
        maps = []
        for block in self.net.stages:
            x = block(x)
            maps.append(x)
        last, previous = maps[-1], maps[-2]
        gap = last.mean((2, 3))
        return {"gap": lambda: gap,
                "flat": lambda: last.flatten(1),
                "gap+max": lambda: torch.cat([gap, last.amax((2, 3))], 1),
                "gap+prev2x2": lambda: torch.cat([gap, F.adaptive_avg_pool2d(previous, 2).flatten(1)], 1),
                "flat+gap": lambda: torch.cat([gap, last.flatten(1)], 1)}[self.kind]()


def main(run_dir: str, threads: str, kinds: str) -> None:
    torch.set_num_threads(int(threads))
    run = load_run(run_dir, "cpu")
    train, held_out = _heldout_split(load_dataset(run.cfg.data.labelled())[0], run)
    net = next(m for m in run.encoder.modules() if isinstance(m, SmallResNet))
    mean, std = run.meta["mean"], run.meta["std"]
    for kind in kinds.split(","):
        start = time.time()
        model = ReadOut(net, kind)
        fit, test = extract_features(model, train, mean, std), extract_features(model, held_out, mean, std)
        knn = evaluate_features("knn", fit, train.labels, test, held_out.labels, train.num_classes)
        linear = evaluate_features("linear", fit, train.labels, test, held_out.labels, train.num_classes)
        print(f"{kind:12s} dim {fit.shape[1]:5d} knn {knn * 100:.2f} linear {linear * 100:.2f} ({time.time() - start:.0f}s)",
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
