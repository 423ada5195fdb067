"""One entry point from a data config to (train, test) :class:`~selfsup.data.dense.DenseSet` s: the dense
protocols' data.

``data.name`` is

- ``fashion-mnist-scenes``: the procedural scenes (:mod:`selfsup.data.scenes`), at ``data.image_size`` (default 64);
- a VOC-style folder (``JPEGImages/`` + ``SegmentationClass/`` PNG class masks, or ``images/`` + ``masks/``;
  boxes from ``Annotations/*.xml`` or ``SegmentationObject/``): :mod:`selfsup.data.voc`;
- a COCO-style JSON file, or a folder holding the train and test JSON files: :mod:`selfsup.data.coco`.

Images of folders and COCO files go through the image-folder cache (decoded once); their masks and boxes are
cached beside it (:mod:`selfsup.data.dense_cache`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from selfsup.config import DataConfig
from selfsup.data.dense import DenseSet
from selfsup.data.imageset import DataError

DENSE_NAMED = ("fashion-mnist-scenes",)
DEFAULT_DENSE_SIZE = 64


def is_dense_source(name: str) -> bool:
    """Whether ``data.name`` names dense annotations (the scenes, a VOC-style folder or a COCO file/folder)."""
    if name in DENSE_NAMED:
        return True
    path = Path(name).expanduser()
    if not path.exists():
        return False
    from selfsup.data.coco import is_coco_source
    from selfsup.data.voc import is_voc_folder

    return is_voc_folder(path) or is_coco_source(path)


def load_dense(cfg: DataConfig) -> tuple[DenseSet, DenseSet]:
    """(train, test) dense sets for ``cfg`` (module docstring); a clear :class:`DataError` for anything else."""
    name = cfg.name
    size = cfg.image_size or DEFAULT_DENSE_SIZE
    if name == "fashion-mnist-scenes":
        from selfsup.data.scenes import SceneSettings, make_scenes

        return make_scenes(cfg.root, SceneSettings(size=size))
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"no dense annotations at {name!r}: not one of {', '.join(DENSE_NAMED)} and no such path "
                        "(give a VOC-style folder, a COCO JSON file or a folder of COCO JSON files)")
    from selfsup.data.coco import is_coco_source, load_coco
    from selfsup.data.voc import is_voc_folder, load_voc_folder

    common = dict(image_size=size, cache_dir=cfg.cache_dir, cache_size=cfg.cache_size, check=cfg.cache_check)
    if is_voc_folder(path):
        return load_voc_folder(path, **common)
    if is_coco_source(path):
        return load_coco(path, image_root=cfg.root, **common)
    raise DataError(f"{name} holds no dense annotations selfsup reads: a VOC-style folder has JPEGImages/ (or "
                    "images/) and SegmentationClass/ (or masks/, or Annotations/*.xml); a COCO source is a JSON file "
                    "with images, annotations and categories, or a folder of them (train.json and test.json)")


def dense_config(cfg: DataConfig, name: str | None, root: str | None, image_size: int) -> DataConfig:
    """The data config of a dense evaluation: the run's own data, or ``name`` (another source) at the encoder's
    size; the run's cache settings stay."""
    if name is None:
        return dataclasses.replace(cfg.labelled(), image_size=image_size)
    return dataclasses.replace(cfg.labelled(), name=name, root=root, image_size=image_size)
