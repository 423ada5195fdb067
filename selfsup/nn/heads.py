"""The one MLP builder every projector, predictor and classifier head uses."""
from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(dims: Sequence[int], norm: str | None = "bn", last_norm: bool = False, last_bias: bool = True,
        activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers ``dims[0] → dims[1] → … → dims[-1]`` with norm + activation between them.

    ``norm``: ``"bn"`` (BatchNorm1d), ``"ln"`` (LayerNorm) or ``None``. ``last_norm`` adds an affine-free
    BatchNorm after the last layer (SimCLR v2 / MoCo v3 projectors). Hidden layers carry no bias when
    followed by a norm, which would cancel it.
    """
    if len(dims) < 2:
        raise ValueError(f"mlp needs at least an input and an output width, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        if last:
            layers.append(nn.Linear(din, dout, bias=last_bias and not last_norm))
            if last_norm:
                layers.append(nn.BatchNorm1d(dout, affine=False))
        else:
            layers.append(nn.Linear(din, dout, bias=norm is None))
            if norm == "bn":
                layers.append(nn.BatchNorm1d(dout))
            elif norm == "ln":
                layers.append(nn.LayerNorm(dout))
            layers.append(activation())
    return nn.Sequential(*layers)
