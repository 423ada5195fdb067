"""CIFAR-10/100 (Krizhevsky 2009) in their python-pickle batch layout.

The batches are pickles of plain dicts of bytes, lists and NumPy arrays; they are read with a
restricted unpickler that allows only NumPy's array reconstruction, never arbitrary code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from selfsup.data.imageset import DataError, ImageSet

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError) as exc:
        raise DataError(f"{path} is not a readable CIFAR batch ({exc})") from None


def is_cifar_dir(path: Path) -> bool:
    return (path / "data_batch_1").is_file() or ((path / "train").is_file() and (path / "test").is_file())


def _to_set(batches: list[dict], label_key: bytes, classes: list[str], name: str) -> ImageSet:
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return ImageSet(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels), classes, name)


def load_cifar(root: str | Path) -> tuple[ImageSet, ImageSet]:
    base = Path(root)
    if (base / "data_batch_1").is_file():
        meta = _read_batch(base / "batches.meta") if (base / "batches.meta").is_file() else {}
        classes = [c.decode() for c in meta.get(b"label_names", [])]
        train = [_read_batch(p) for p in sorted(base.glob("data_batch_*"))]
        return (_to_set(train, b"labels", classes, "cifar10/train"),
                _to_set([_read_batch(base / "test_batch")], b"labels", classes, "cifar10/test"))
    if (base / "train").is_file():
        meta = _read_batch(base / "meta") if (base / "meta").is_file() else {}
        classes = [c.decode() for c in meta.get(b"fine_label_names", [])]
        return (_to_set([_read_batch(base / "train")], b"fine_labels", classes, "cifar100/train"),
                _to_set([_read_batch(base / "test")], b"fine_labels", classes, "cifar100/test"))
    raise DataError(
        f"{base} holds no CIFAR batches: expected data_batch_1..5 and test_batch (CIFAR-10) or train and test "
        "(CIFAR-100) from the 'python version' archives, unpacked; nothing is downloaded at run time"
    )
