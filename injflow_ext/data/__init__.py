"""Datasets and the true manifolds' charts (for the KL of a model to the truth)."""

from .datasets import (
    DATASET_NAMES,
    IMAGE_MODEL_DATASETS,
    SYNTHETIC,
    TABULAR,
    Dataset,
    load_dataset,
)

__all__ = ["Dataset", "load_dataset", "SYNTHETIC", "TABULAR", "DATASET_NAMES",
           "IMAGE_MODEL_DATASETS"]
