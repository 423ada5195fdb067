"""Datasets as uint8 image sets (in memory, or memory-mapped from an image folder's on-disk cache), splits
and label subsets."""
from selfsup.data.cache import load_image_folder
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.load import load_dataset, pretraining_holdout, split_labelled
from selfsup.data.splits import holdout_split, parse_fraction, stratified_subset
from selfsup.data.stream import prefetch_batches
from selfsup.data.video_folder import load_video_folder

__all__ = ["DataError", "ImageSet", "load_dataset", "load_image_folder", "load_video_folder", "prefetch_batches",
           "pretraining_holdout", "split_labelled", "holdout_split", "parse_fraction", "stratified_subset"]
