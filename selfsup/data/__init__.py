"""Datasets as in-memory ``uint8`` image sets, splits and label subsets."""
from selfsup.data.imageset import DataError, ImageSet
from selfsup.data.load import load_dataset, pretraining_holdout, split_labelled
from selfsup.data.splits import holdout_split, parse_fraction, stratified_subset

__all__ = ["DataError", "ImageSet", "load_dataset", "pretraining_holdout", "split_labelled", "holdout_split", "parse_fraction",
           "stratified_subset"]
