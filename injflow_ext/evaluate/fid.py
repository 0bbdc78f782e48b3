"""FID: the Fréchet distance of Inception-v3 pool features (pytorch-fid's network and weights,
the standard ones), used only where they are already on this machine — nothing is downloaded
during an evaluation. :func:`fid_unavailable` says why not otherwise; the evaluation then
reports the raw-pixel Fréchet distance alone (:func:`injflow_ext.evaluate.metrics.frechet_distance`)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from .metrics import frechet_distance

__all__ = ["FID_WEIGHTS_FILE", "fid_unavailable", "inception_fid"]

# pytorch-fid's port of the TensorFlow FID Inception weights, as torch.hub caches it
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def _weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_FILE)


def fid_unavailable() -> str | None:
    """None when FID can be computed here, else what is missing and how to get it."""
    if importlib.util.find_spec("pytorch_fid") is None:
        return ("FID needs pytorch-fid and its Inception weights: pip install pytorch-fid, then "
                "run `python -m pytorch_fid --help` once online (or copy "
                f"{FID_WEIGHTS_FILE} into {os.path.dirname(_weights_path())})")
    if not os.path.exists(_weights_path()):
        return (f"FID needs the Inception weights {_weights_path()} (pytorch-fid downloads them "
                "on first use; this evaluation does not download): copy the file there")
    return None


@torch.no_grad()
def inception_fid(samples: np.ndarray, reference: np.ndarray, image_shape, batch_size: int = 100,
                  device: str = "cpu") -> float:
    """FID between image sets ``samples (N, C·H·W)`` and ``reference (M, C·H·W)`` with pixels
    in [0, 1] (clipped), ``image_shape`` (C, H, W) or (H, W); grey images are repeated to three
    channels and resized to 299 × 299 by the network, as pytorch-fid does."""
    reason = fid_unavailable()
    if reason:
        raise RuntimeError(reason)
    from pytorch_fid.inception import InceptionV3
    net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                      normalize_input=True).to(device).eval()
    shape = tuple(image_shape) if len(image_shape) == 3 else (1, *image_shape)

    def features(x):
        out = []
        for i in range(0, len(x), batch_size):
            b = torch.as_tensor(np.clip(x[i:i + batch_size], 0, 1), dtype=torch.float32,
                                device=device).reshape(-1, *shape)
            if shape[0] == 1:
                b = b.expand(-1, 3, -1, -1)
            out.append(net(b)[0].flatten(1).double().cpu())
        return torch.cat(out).numpy()
    return frechet_distance(features(samples), features(reference))
