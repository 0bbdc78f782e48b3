"""Plain-PyTorch references of a RectangularFlow training step, on the same weights.

They are what a user would write without this library (docs/design.md §5, bench/RESULTS.md):
- ``exact_one_tangent``: d separate forward-mode passes, one tangent each, the primal
  recomputed every time (the original paper's code style);
- ``exact_batched``: the primal once and all d tangents beside it, separate GEMMs and
  elementwise ops per layer (the strongest plain eager reference);
- ``exact_jacfwd``: ``torch.func.jacfwd`` under ``vmap``;
- ``hutchinson_cg``: Hutchinson probes, CG written with torch ops (convergence test with a host
  sync per iteration), matrix-free ``Jᵀ(J v)`` by a tangent pass and autograd VJPs;
- ``encoder_surrogate``: the encoder-Jacobian surrogate of free-form injective flows, the way
  their code writes it: ``vᵀ f′(x)`` by autograd through the encoder, ``J v`` by a tangent pass.
Each returns the loss (a scalar to backpropagate). They take fully connected models and image
models (``RectangularFlow.images``): an image coupling's CNN runs the plain way, one
``F.conv2d`` of the primal and tangent images stacked as one batch per layer, the activation's
tangent rule as elementwise torch ops after it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..nn import ActNorm, AffineCoupling, InvertibleLinear, Permutation
from ..nn.image import ConvAffineCoupling, InvertibleConv1x1
from ..train.objectives import BETA as _BETA_OPTION

BETA = _BETA_OPTION.default   # the objectives' default β

__all__ = ["exact_batched", "exact_one_tangent", "exact_jacfwd", "hutchinson_cg", "encoder_surrogate",
           "reference_cg", "mlp_tangents", "ambient_tangents", "plain_tangent_mlp"]

_ACT = {"tanh": torch.tanh, "relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid,
        "softplus": F.softplus, "elu": F.elu, None: lambda z: z}


def _act_and_derivative(name, z):
    if name == "tanh":
        a = torch.tanh(z)
        return a, 1 - a * a
    if name is None:
        return z, torch.ones_like(z)
    if name == "relu":
        return F.relu(z), (z > 0).to(z.dtype)
    a = _ACT[name](z)
    da = torch.autograd.functional.jvp(_ACT[name], z, torch.ones_like(z), create_graph=True)[1]
    return a, da


def _activate(name, z, Zd, hidden):
    """A layer's output from its pre-activations, primal ``z (B, ...)`` and tangents
    ``Zd (B, K, ...)``: ``σ(z), σ'(z) ⊙ Zd`` for a hidden layer, unchanged for the last."""
    if not hidden:
        return z, Zd
    a, da = _act_and_derivative(name, z)
    return a, da.unsqueeze(1) * Zd


def mlp_tangents(mlp, h, Hd):
    """Primal h (B, n) and tangents Hd (B, K, n) through the conditioner, separate GEMMs."""
    last = len(mlp.weights) - 1
    for i, (W, b) in enumerate(zip(mlp.weights, mlp.biases)):
        h, Hd = _activate(mlp.activation, h @ W.T + b, Hd @ W.T, i < last)
    return h, Hd


def plain_tangent_mlp(XV, weights, biases):
    """A tanh MLP on packed rows XV (B, 1+K, n) the plain way: the primal once and the K
    tangents beside it, per layer ``z = x Wᵀ + b; a = tanh(z); V = (1 − a²) ⊙ (V Wᵀ)``."""
    x, V = XV[:, 0], XV[:, 1:]
    for i, (W, b) in enumerate(zip(weights, biases)):
        z = x @ W.T + b
        VW = V @ W.T
        if i < len(weights) - 1:
            x = torch.tanh(z)
            V = (1 - x * x).unsqueeze(1) * VW
        else:
            x, V = z, VW
    return torch.cat([x.unsqueeze(1), V], dim=1)


def _take(x, idx):
    """x[..., idx] as a gather (much faster backward than advanced indexing on the CPU); the
    coupling layers' split/merge do the same, so ours and the references index alike."""
    return torch.gather(x, -1, idx.expand(*x.shape[:-1], idx.numel()))


def conv_tangents(net, X, Vd):
    """A ConvNet's primal images X (B, C, H, W) and tangent images Vd (B, K, C, H, W), the plain
    way: per layer one ``F.conv2d`` of the stacked batch ``[X; V]`` (the convolution is linear,
    so the tangents go through the same weights, with the bias on the primal only), then
    ``a = σ(z)`` and ``V = σ'(z) ⊙ (W ⋆ V)``."""
    B, K = Vd.shape[:2]
    last = len(net.weights) - 1
    for i, (W, b) in enumerate(zip(net.weights, net.biases)):
        Z = F.conv2d(torch.cat([X, Vd.reshape(B * K, *Vd.shape[2:])]), W, padding=1)
        X, Vd = _activate(net.activation, Z[:B] + b[:, None, None],
                          Z[B:].reshape(B, K, *Z.shape[1:]), i < last)
    return X, Vd


def _coupling_st(layer, x, V):
    """``s, t`` (B, m) and their tangents (B, K, m) of an image coupling at its transformed
    features, from its CNN on the masked image."""
    C, H, W = layer.shape
    B, K = V.shape[:2]
    mask = layer.mask.to(x.dtype)
    st, STd = conv_tangents(layer.conditioner, (x * mask).view(B, C, H, W),
                            (V * mask).view(B, K, C, H, W))
    st, STd = st.reshape(B, 2, layer.n), STd.reshape(B, K, 2, layer.n)
    return (_take(st[:, 0], layer.idx_b), _take(st[:, 1], layer.idx_b),
            _take(STd[:, :, 0], layer.idx_b), _take(STd[:, :, 1], layer.idx_b))


def ambient_tangents(model, x, V):
    """y = h(x) (B, D) and Ẏ = (∂h/∂x) V (B, K, D), plain torch ops."""
    for layer in model.ambient.layers:
        if isinstance(layer, ActNorm):
            e = torch.exp(layer.log_scale).repeat_interleave(layer.group_size)
            x, V = x * e + layer.shift.repeat_interleave(layer.group_size), V * e
        elif isinstance(layer, Permutation):
            x, V = _take(x, layer.perm), _take(V, layer.perm)
        elif isinstance(layer, InvertibleConv1x1):
            Wm, C = layer.linear.weight(), layer.shape[0]
            x = (Wm @ x.reshape(x.shape[0], C, layer.pixels)).reshape(x.shape)
            V = (Wm @ V.reshape(*V.shape[:2], C, layer.pixels)).reshape(V.shape)
        elif isinstance(layer, ConvAffineCoupling):
            s, t, Sd, Td = _coupling_st(layer, x, V)
            xa, xb = _take(x, layer.idx_a), _take(x, layer.idx_b)
            Va, Vb = _take(V, layer.idx_a), _take(V, layer.idx_b)
            ts = torch.tanh(s) if layer.scale == "tanh" else s
            dts = (1 - ts * ts) if layer.scale == "tanh" else torch.ones_like(s)
            e = torch.exp(ts)
            yb = xb * e + t
            Yb = Vb * e.unsqueeze(1) + (xb * e * dts).unsqueeze(1) * Sd + Td
            x = _take(torch.cat([xa, yb], -1), layer.unperm)
            V = _take(torch.cat([Va, Yb], -1), layer.unperm)
        elif isinstance(layer, InvertibleLinear):
            W = layer.weight()
            x, V = x @ W.T, V @ W.T
        elif isinstance(layer, AffineCoupling):
            (xa, xb), (Va, Vb) = layer.split(x), layer.split(V)
            st, STd = mlp_tangents(layer.conditioner, xa, Va)
            m = xb.shape[-1]
            s, t, Sd, Td = st[:, :m], st[:, m:], STd[..., :m], STd[..., m:]
            ts = torch.tanh(s)
            e = torch.exp(ts)
            yb = xb * e + t
            Yb = Vb * e.unsqueeze(1) + (xb * e * (1 - ts * ts)).unsqueeze(1) * Sd + Td
            x, V = layer.merge(xa, yb), layer.merge(Va, Yb)
        else:
            raise TypeError(type(layer).__name__)
    return x, V


def _inverse_layers(layers, y):
    lad_total = y.new_zeros(y.shape[0])
    for layer in reversed(layers):
        if isinstance(layer, ActNorm):
            g = layer.group_size
            y = (y - layer.shift.repeat_interleave(g)) * torch.exp(-layer.log_scale).repeat_interleave(g)
            lad_total = lad_total - g * layer.log_scale.sum()
        elif isinstance(layer, Permutation):
            y = _take(y, layer.inv_perm)
        elif isinstance(layer, InvertibleLinear):
            Wm = layer.weight()
            y = torch.linalg.solve(Wm, y.T).T
            lad_total = lad_total - torch.linalg.slogdet(Wm)[1]
        elif isinstance(layer, InvertibleConv1x1):
            Wm, C = layer.linear.weight(), layer.shape[0]
            y = torch.linalg.solve(Wm, y.reshape(y.shape[0], C, -1)).reshape(y.shape)
            lad_total = lad_total - layer.pixels * torch.linalg.slogdet(Wm)[1]
        elif isinstance(layer, ConvAffineCoupling):
            s, t, _, _ = _coupling_st(layer, y, y.new_zeros(y.shape[0], 0, y.shape[1]))
            ts = torch.tanh(s) if layer.scale == "tanh" else s
            xb = (_take(y, layer.idx_b) - t) * torch.exp(-ts)
            y = _take(torch.cat([_take(y, layer.idx_a), xb], -1), layer.unperm)
            lad_total = lad_total - ts.sum(-1)
        elif isinstance(layer, AffineCoupling):
            ya, yb = layer.split(y)
            st, _ = mlp_tangents(layer.conditioner, ya, ya.new_zeros(ya.shape[0], 0, ya.shape[1]))
            s, t = st.chunk(2, -1)
            ts = torch.tanh(s)
            y = layer.merge(ya, (yb - t) * torch.exp(-ts))
            lad_total = lad_total - ts.sum(-1)
        else:
            raise TypeError(type(layer).__name__)
    return y, lad_total


def encode(model, x):
    return _inverse_layers(model.ambient.layers, x)[0][:, :model.latent_dim]


def prior_log_prob(model, u):
    z, lad = _inverse_layers(model.prior.layers, u)
    return -0.5 * (z * z).sum(-1) - 0.5 * model.latent_dim * math.log(2 * math.pi) + lad


def _pad(model, t):
    return torch.cat([t, t.new_zeros(*t.shape[:-1], model.ambient_dim - model.latent_dim)], -1)


def _cholesky_logdet(J):
    # cholesky_ex: no host check of the factorisation's status, so the step has no
    # synchronisation and can be captured in a CUDA graph (a failed factorisation gives NaN).
    L = torch.linalg.cholesky_ex(J.mT @ J).L
    return 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)


def _loss(model, x, u, x_rec, logdet, beta):
    rec = ((x - x_rec) ** 2).sum(-1)
    return (-prior_log_prob(model, u) + 0.5 * logdet + beta * rec).mean()


def exact_batched(model, x, beta=BETA):
    u = encode(model, x)
    d = model.latent_dim
    eye = torch.eye(d, dtype=x.dtype, device=x.device).expand(x.shape[0], d, d)
    x_rec, JT = ambient_tangents(model, _pad(model, u), _pad(model, eye))
    return _loss(model, x, u, x_rec, _cholesky_logdet(JT.mT), beta)


def exact_one_tangent(model, x, beta=BETA):
    u = encode(model, x)
    d = model.latent_dim
    cols = []
    for k in range(d):
        e_k = torch.zeros(x.shape[0], 1, d, dtype=x.dtype, device=x.device)
        e_k[:, 0, k] = 1
        x_rec, col = ambient_tangents(model, _pad(model, u), _pad(model, e_k))
        cols.append(col[:, 0])
    return _loss(model, x, u, x_rec, _cholesky_logdet(torch.stack(cols, -1)), beta)


def exact_jacfwd(model, x, beta=BETA):
    u = encode(model, x)

    def decode_one(ui):
        x1, _ = ambient_tangents(model, _pad(model, ui.unsqueeze(0)),
                                 ui.new_zeros(1, 0, model.ambient_dim))
        return x1.squeeze(0)

    J = torch.func.vmap(torch.func.jacfwd(decode_one))(u)
    x_rec, _ = ambient_tangents(model, _pad(model, u), u.new_zeros(u.shape[0], 0, model.ambient_dim))
    return _loss(model, x, u, x_rec, _cholesky_logdet(J), beta)


def reference_cg(matvec, b, rtol, max_iter):
    """CG on b (B, d, K) with torch ops, host sync per iteration for the convergence test."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1, keepdim=True)
    tol2 = rtol ** 2 * (b * b).sum(1, keepdim=True)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is the count returned below
        Ap = matvec(p)
        alpha = rs / (p * Ap).sum(1, keepdim=True).clamp(min=1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(1, keepdim=True)
        if bool((rs_new <= tol2).all()):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, it


def hutchinson_cg(model, x, beta=BETA, K=1, rtol=1e-5, generator=None, return_iterations=False):
    u = encode(model, x)
    B, d = u.shape
    eps = torch.randn(B, K, d, dtype=x.dtype, device=x.device, generator=generator)
    u0 = u.detach().requires_grad_(True)
    with torch.enable_grad():
        x0, _ = ambient_tangents(model, _pad(model, u0), u0.new_zeros(B, 0, model.ambient_dim))

    def matvec(v):  # (B, d, K) -> Jᵀ J v
        with torch.no_grad():
            _, Jv = ambient_tangents(model, _pad(model, u0.detach()), _pad(model, v.mT))
        cols = [torch.autograd.grad(x0, u0, Jv[:, k], retain_graph=True)[0]
                for k in range(Jv.shape[1])]
        return torch.stack(cols, -1)

    xi, iterations = reference_cg(matvec, eps.mT, rtol, d)
    xi = xi.mT.detach()
    x_rec, JV = ambient_tangents(model, _pad(model, u), _pad(model, torch.cat([eps, xi], 1)))
    surrogate = (JV[:, K:] * JV[:, :K]).sum(-1).mean(-1)
    loss = _loss(model, x, u, x_rec, surrogate, beta)
    return (loss, iterations) if return_iterations else loss


def encoder_surrogate(model, x, beta=BETA, K=1, generator=None):
    """RNF-ML with ``2 mean_k <sg(v_kᵀ f′(x)), J v_k>`` in place of ``log det JᵀJ``; probes
    orthonormal (Gram–Schmidt of ``randn(B, K, d)``) scaled to norm ``√d``."""
    x0 = x.detach().requires_grad_(True)
    u = encode(model, x0)
    B, d = u.shape
    G = torch.randn(B, K, d, dtype=x.dtype, device=x.device, generator=generator)
    rows = []
    for k in range(K):
        g = G[:, k]
        for q in rows:
            g = g - (g * q).sum(-1, keepdim=True) * q
        rows.append(g / g.norm(dim=-1, keepdim=True))
    v = torch.stack(rows, 1) * math.sqrt(d)
    w = torch.stack([torch.autograd.grad(u, x0, v[:, k], retain_graph=True)[0]
                     for k in range(K)], 1)
    x_rec, Jv = ambient_tangents(model, _pad(model, u), _pad(model, v))
    surrogate = 2 * (w * Jv).sum(-1).mean(-1)
    return _loss(model, x, u, x_rec, surrogate, beta)
