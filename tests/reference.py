"""Plain-autograd references for the tests (the library's ops support autograd, not the
torch.func transforms, so references use torch.autograd.functional)."""

import torch


def batched_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians ``(B, m, n)`` of a map ``f: (B, n) -> (B, m)`` acting on each sample
    independently, from the full reverse-mode Jacobian's diagonal blocks."""
    J = torch.autograd.functional.jacobian(f, x, create_graph=torch.is_grad_enabled())
    idx = torch.arange(x.shape[0], device=x.device)
    return J[idx, :, idx, :]


# ------------------------------------------------------------------ plain-PyTorch flows

# The activations in plain PyTorch, by the library's names: the one table of the tests.
PLAIN_ACTIVATIONS = {
    None: lambda z: z,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01),
    "elu": torch.nn.functional.elu,
    "softplus": torch.nn.functional.softplus,
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
}


def plain_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """The forward map of an injflow_ext bijection rewritten with plain torch ops on the same
    parameters (an independent reference that torch.func can differentiate)."""
    from injflow_ext.nn import ActNorm, AffineCoupling, InvertibleLinear, Permutation, Sequential

    if isinstance(layer, Sequential):
        for sub in layer.layers:
            x = plain_forward(sub, x)
        return x
    if isinstance(layer, ActNorm):
        return x * torch.exp(layer.log_scale) + layer.shift
    if isinstance(layer, Permutation):
        return x[..., layer.perm]
    if isinstance(layer, InvertibleLinear):
        return x @ layer.weight().T
    if isinstance(layer, AffineCoupling):
        xa, xb = x[..., layer.idx_a], x[..., layer.idx_b]
        mlp = layer.conditioner
        h = xa
        n = len(mlp.weights)
        for i, (W, b) in enumerate(zip(mlp.weights, mlp.biases)):
            h = h @ W.T + b
            if i < n - 1:
                h = PLAIN_ACTIVATIONS[mlp.activation](h)
        s, t = h.chunk(2, dim=-1)
        st = torch.tanh(s) if layer.scale == "tanh" else s
        yb = xb * torch.exp(st) + t
        return torch.cat([xa, yb], dim=-1)[..., layer.unperm]
    raise TypeError(f"no plain reference for {type(layer).__name__}")


def plain_decoder(model):
    """``u (B, d) -> h(pad(u))`` of a RectangularFlow in plain torch ops."""
    def decode(u):
        pad = u.new_zeros(*u.shape[:-1], model.ambient_dim - model.latent_dim)
        return plain_forward(model.ambient, torch.cat([u, pad], dim=-1))
    return decode


def jacfwd_logdet_jtj(plain_fn, u: torch.Tensor) -> torch.Tensor:
    """``torch.logdet(JᵀJ)`` with ``J`` from ``torch.func.jacfwd`` of a plain-PyTorch decoder."""
    J = torch.func.vmap(torch.func.jacfwd(lambda ui: plain_fn(ui.unsqueeze(0)).squeeze(0)))(u)
    return torch.logdet(J.mT @ J)
