"""The data of a run: which dataset or file, split how, standardised or not, as `injflow
train` takes it and config.json records it (``"data"``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from .datasets import Dataset, load_dataset

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """name: a dataset name (``DATASET_NAMES``) or a .npy/.csv file; data_dir: the folder of
    the tabular/image files; n_samples: at most this many points (None: all; synthetic sets:
    10,000 drawn); seed: of the draw and the train/validation/test split; standardize: the
    model standardises the data by a fixed layer (flows.builders.for_data); dim: the data's
    features, recorded when loaded."""

    name: str
    data_dir: str | None = None
    n_samples: int | None = None
    seed: int = 0
    standardize: bool = True
    dim: int | None = None

    def load(self) -> Dataset:
        """The dataset (and ``dim`` recorded)."""
        data = load_dataset(self.name, seed=self.seed, data_dir=self.data_dir,
                            n_samples=self.n_samples)
        self.dim = data.dim
        return data

    def stored(self) -> DataConfig:
        """This config as config.json keeps it: files and folders absolute, so that a run
        resumes from any working directory; dataset names stay names."""
        def absolute(path):
            return os.path.abspath(path) if path and os.path.exists(path) else path
        return DataConfig(**{**asdict(self), "name": absolute(self.name),
                             "data_dir": absolute(self.data_dir)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> DataConfig:
        """A config.json's ``"data"`` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})
