"""A plain-PyTorch training loss of Free-form Injective Flows, written as vislearn/FFF computes
it (``fff/loss.py``: ``volume_change_surrogate``, ``fff_loss``; ``fff/base.py``:
``noisy_reconstruction``): ``g′(z) v`` by forward-mode AD (``torch.autograd.forward_ad`` dual
numbers), ``vᵀ f′(x)`` by a backward pass with ``create_graph=True`` (a second-order pass
through the encoder), ``surrogate = mean_k Σ vᵀf′(x) · sg(g′(z) v)``, and

    loss = mean(β‖x − g(z)‖² − log p(z) − surrogate).

The benchmarks time it against :class:`injflow_ext.train.fif.FifObjective` on the same
networks after checking that both give the same loss and gradients in float64 with the same
probes (tests/test_free_form.py does the same).
"""

from __future__ import annotations

import torch
from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual

__all__ = ["fif_reference_loss"]


def fif_reference_loss(x: torch.Tensor, encode, decode, latent_log_prob, beta: float,
                       v: torch.Tensor) -> torch.Tensor:
    """FFF's FIF loss of a batch ``x (B, D)`` (already noisy) with probes ``v (B, K, d)``.

    ``encode (B, D) -> (B, d)``, ``decode (B, d) -> (B, D)``, ``latent_log_prob (B, d) -> (B,)``
    are plain callables (e.g. a FreeFormFlow's ``encoder_net``, ``decoder_net`` and
    ``prior_log_prob``)."""
    x = x.detach().requires_grad_(True)
    z = encode(x)
    K = v.shape[1]
    surrogate = 0
    x1 = None
    for k in range(K):
        vk = v[:, k]
        with dual_level():
            x1_dual = decode(make_dual(z, vk))
            x1, v1 = unpack_dual(x1_dual)
        v2, = torch.autograd.grad(z, x, vk, create_graph=True)
        surrogate = surrogate + (v2 * v1.detach()).sum(-1) / K
    mse = ((x - x1) ** 2).sum(-1)
    nll = -latent_log_prob(z) - surrogate
    return (beta * mse + nll).mean()
