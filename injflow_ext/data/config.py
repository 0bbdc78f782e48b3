"""The data of a run: which dataset or file, split how, standardised or not, as `injflow
train` takes it and config.json records it (``"data"``)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, fields

from .datasets import TABULAR, Dataset, load_dataset

__all__ = ["DataConfig"]


@dataclass
class DataConfig:
    """name: a dataset name (``DATASET_NAMES``) or a .npy/.csv file; data_dir: the folder of
    the tabular/image files; n_samples: at most this many points (None: all; synthetic sets:
    10,000 drawn); seed: of the draw and the train/validation/test split; standardize: the
    model standardises the data by a fixed layer (flows.builders.for_data); dim: the data's
    features, recorded when loaded; fingerprint: what the training data was
    (:meth:`fingerprint_of`), recorded by ``injflow train``."""

    name: str
    data_dir: str | None = None
    n_samples: int | None = None
    seed: int = 0
    standardize: bool = True
    dim: int | None = None
    fingerprint: dict | None = None

    def load(self) -> Dataset:
        """The dataset (``dim`` recorded; the fingerprint is :meth:`fingerprint_of`'s, which
        training records and compares)."""
        data = load_dataset(self.name, seed=self.seed, data_dir=self.data_dir,
                            n_samples=self.n_samples)
        self.dim = data.dim
        return data

    def fingerprint_of(self, data: Dataset) -> dict:
        """What the training data is: for a data file (and the tabular sets' files) its path,
        size in bytes and the SHA-256 of the loaded arrays (train, validation, test, float64);
        for the built-in and torchvision sets their name, the split's sizes and the size."""
        split = {"train": len(data.train), "val": len(data.val), "test": len(data.test)}
        path = self._file()
        if path is None:
            return {"name": self.name, "split": split, "size": sum(split.values())}
        digest = hashlib.sha256()
        for part in (data.train, data.val, data.test):
            digest.update(part.astype("float64").tobytes())
        return {"path": os.path.abspath(path), "bytes": os.path.getsize(path),
                "sha256": digest.hexdigest(), "split": split}

    @staticmethod
    def same_data(old: dict, new: dict) -> bool:
        """Whether two fingerprints are of the same data (a file's path may differ: the same
        content in another folder is the same data)."""
        def content(fp):
            return {k: v for k, v in fp.items() if k != "path"}
        return content(old) == content(new)

    def _file(self) -> str | None:
        """The file the data comes from, None for a built-in or torchvision set."""
        if self.name in TABULAR:
            path = os.path.join(self.data_dir or ".", TABULAR[self.name][0])
            return path if os.path.exists(path) else None
        return self.name if os.path.isfile(self.name) else None

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
