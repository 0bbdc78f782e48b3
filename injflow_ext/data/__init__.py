"""Datasets and the true manifolds' charts (for the KL of a model to the truth)."""

from .config import DataConfig
from .datasets import (
    DATASET_NAMES,
    IMAGE_MODEL_DATASETS,
    SYNTHETIC,
    TABULAR,
    Dataset,
    load_dataset,
)

__all__ = ["Dataset", "DataConfig", "load_dataset", "SYNTHETIC", "TABULAR", "DATASET_NAMES",
           "IMAGE_MODEL_DATASETS"]
