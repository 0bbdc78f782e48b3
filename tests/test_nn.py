"""Bijections: inverse(forward(x)) == x, logabsdet == log|det| of the Jacobian, jvp == J·V with J
the reverse-mode Jacobian of forward, batched tangents (float64), argument errors."""

import pytest
import torch
from reference import batched_jacobian

from injflow_ext.nn import (
    MLP,
    ActNorm,
    AffineCoupling,
    ElementwiseSpline,
    InvertibleLinear,
    Permutation,
    Reverse,
    Sequential,
)


def perturb(layer):
    """Move every parameter off its (identity-like) initialisation."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def make_layers(n):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[1::2] = True
    return {
        "coupling_half": AffineCoupling(n, (16, 16), "tanh"),
        "coupling_mask_silu": AffineCoupling(n, (8,), "silu", mask=mask),
        "coupling_exp_scale": AffineCoupling(n, (8,), "softplus", scale="exp"),
        "actnorm": ActNorm(n),
        "permutation": Permutation(n, seed=3),
        "reverse": Reverse(n),
        "invertible_linear": InvertibleLinear(n, seed=1),
        # bound 1.5: standard-normal inputs land both inside the spline and in its linear tails
        "spline": ElementwiseSpline(n, bins=6, bound=1.5),
        "sequential": Sequential(ActNorm(n), AffineCoupling(n, (8,)), Permutation(n),
                                 InvertibleLinear(n), AffineCoupling(n, (8,), "elu")),
    }


LAYER_NAMES = list(make_layers(4))


@pytest.fixture(params=LAYER_NAMES)
def layer(request, device):
    torch.manual_seed(1)
    layer = make_layers(5)[request.param]
    layer = perturb(layer).double().to(device)
    return layer.eval()


def test_inverse_of_forward(layer, device):
    x = torch.randn(11, 5, dtype=torch.float64, device=device)
    y, lad = layer(x)
    x_back, lad_inv = layer.inverse_with_logabsdet(y)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad_inv, -lad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-10, atol=1e-10)


def test_logabsdet_is_log_det_jacobian(layer, device):
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    _, lad = layer(x)
    J = batched_jacobian(lambda x_: layer(x_)[0], x)
    torch.testing.assert_close(lad, torch.linalg.slogdet(J).logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 3])
def test_jvp_matches_jacobian_times_tangents(layer, device, K):
    x = torch.randn(7, 5, dtype=torch.float64, device=device)
    V = torch.randn(7, K, 5, dtype=torch.float64, device=device)
    y, Yd = layer.jvp(x, V)
    f = lambda x_: layer(x_)[0]  # noqa: E731
    torch.testing.assert_close(y, f(x), rtol=1e-12, atol=1e-12)
    J = batched_jacobian(f, x)  # (B, n, n), reverse mode
    torch.testing.assert_close(Yd, V @ J.mT, rtol=1e-10, atol=1e-10)


def test_parameters_get_gradients_through_jvp(layer, device):
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    V = torch.randn(4, 2, 5, dtype=torch.float64, device=device)
    y, Yd = layer.jvp(x, V)
    params = [p for p in layer.parameters()]
    if not params:
        pytest.skip("layer has no parameters")
    grads = torch.autograd.grad((y.sin().sum() + Yd.square().sum()), params, allow_unused=True)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_actnorm_data_dependent_init():
    torch.manual_seed(0)
    x = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]) + 3
    a = ActNorm(3).double()
    y, _ = a(x)                                   # training mode: initialises from this batch
    torch.testing.assert_close(y.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)
    # std / (std + eps) with eps = 1e-6: off by eps/std = 1e-5 for the feature with std 0.1
    torch.testing.assert_close(y.std(0), torch.ones(3, dtype=torch.float64), atol=2e-5, rtol=0)
    assert bool(a.initialized)
    a2 = ActNorm(3).double()
    z = a2.inverse(x)                             # inverse direction standardises its output
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)
    b = ActNorm(3).double().eval()
    torch.testing.assert_close(b(x)[0], x)        # eval mode: no initialisation


def test_coupling_starts_as_identity():
    c = AffineCoupling(4, (8,)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, lad = c(x)
    torch.testing.assert_close(y, x)
    assert (lad == 0).all()


def test_coupling_on_one_feature_learns_constants():
    c = perturb(AffineCoupling(1, (4,))).double()
    x = torch.randn(5, 1, dtype=torch.float64)
    y, lad = c(x)
    torch.testing.assert_close(c.inverse(y), x)
    assert torch.allclose(lad, lad[0].expand(5))  # s does not depend on x


def test_spline_starts_as_identity_and_is_monotone():
    s = ElementwiseSpline(3, bins=5)
    x = torch.linspace(-6, 6, 301).unsqueeze(1).expand(-1, 3).contiguous()
    y, lad = s(x)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(lad, torch.zeros(301), atol=1e-5, rtol=0)
    perturb(s)
    y, _ = s(x)
    assert (y.diff(dim=0) > 0).all()   # strictly increasing, also across the bound
    with pytest.raises(ValueError, match="bins must be >= 2"):
        ElementwiseSpline(2, bins=1)


def test_invertible_linear_starts_orthogonal():
    W = InvertibleLinear(6, seed=2).double().weight()
    torch.testing.assert_close(W @ W.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_mlp_packed_matches_plain():
    torch.manual_seed(0)
    mlp = perturb(MLP(3, 4, (5, 6), "tanh")).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    h = x
    for i, (W, b) in enumerate(zip(mlp.weights, mlp.biases)):
        h = h @ W.T + b
        if i < 2:
            h = torch.tanh(h)
    torch.testing.assert_close(mlp(x), h)


@pytest.mark.parametrize("make,pattern", [
    (lambda: AffineCoupling(3, mask=torch.ones(3, dtype=torch.bool)), "at least one feature"),
    (lambda: AffineCoupling(3, mask=torch.ones(4, dtype=torch.bool)), r"shape \(3,\)"),
    (lambda: AffineCoupling(3, scale="sigmoid"), "scale must be one of"),
    (lambda: AffineCoupling(3, activation="gelu"), "unknown activation 'gelu'"),
    (lambda: Permutation(3, perm=torch.tensor([0, 0, 1])), "permutation of range"),
])
def test_bad_construction(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_wrong_width():
    with pytest.raises(ValueError, match=r"ActNorm: x must have 3 features .* got shape \(2, 4\)"):
        ActNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"AffineCoupling: y must have 3 features"):
        AffineCoupling(3).inverse(torch.randn(2, 5))
