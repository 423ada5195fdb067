"""Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) from its IDX ``.gz`` files."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from selfsup.data.imageset import DataError, ImageSet

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
HOW_TO_GET = (
    "install the Debian package with `apt-get install dataset-fashion-mnist` "
    f"(it puts the files under {DEFAULT_ROOT}), or pass --data-root DIR pointing at a folder that holds "
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic (0, 0, dtype, ndim), big-endian dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read ({exc}); reinstall it: {HOW_TO_GET}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}.gz not found in {root}; {HOW_TO_GET}")


def load_fashion_mnist(root: str | None = None) -> tuple[ImageSet, ImageSet]:
    base = Path(root or DEFAULT_ROOT)
    if not base.is_dir():
        raise DataError(f"Fashion-MNIST not found: {base} does not exist; {HOW_TO_GET}")
    sets = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(base, f"{prefix}-labels-idx1-ubyte"))
        sets.append(ImageSet(torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)),
                             list(CLASSES), f"fashion-mnist/{split}"))
    return sets[0], sets[1]
