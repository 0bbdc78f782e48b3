"""logdet_jtj: exact against torch.logdet(JᵀJ) with J from autograd (value and every
parameter gradient), Hutchinson gradient against the exact one within its standard error, fast
path against the generic path, errors."""

import pytest
import torch
from reference import jacfwd_logdet_jtj, plain_decoder

from injflow_ext import RectangularFlow, tangent_linear_packed
from injflow_ext.estimators import decoder_jacobian, logdet_jtj


def small_model(D=5, d=2, seed=0):
    torch.manual_seed(seed)
    m = RectangularFlow.tabular(D, d, ambient_layers=2, ambient_hidden=(12, 12), prior_layers=1,
                        prior_hidden=(4,), actnorm=False).double()
    with torch.no_grad():  # leave the identity initialisation so that J is not trivial
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


class MirroredMLP:
    """The same tanh MLP decoder twice: ``__call__`` in plain PyTorch (generic path through
    torch.func) and ``jvp_packed`` with the library's tangent ops (fast path)."""

    def __init__(self, sizes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.params = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            self.params += [(torch.randn(b, a, generator=g, dtype=torch.float64) / a ** 0.5),
                            torch.randn(b, generator=g, dtype=torch.float64) * 0.1]
        self.params = [p.requires_grad_() for p in self.params]

    def __call__(self, u):
        h = u
        n = len(self.params) // 2
        for i in range(n):
            h = h @ self.params[2 * i].T + self.params[2 * i + 1]
            if i < n - 1:
                h = torch.tanh(h)
        return h

    def jvp_packed(self, UV):
        n = len(self.params) // 2
        for i in range(n):
            UV = tangent_linear_packed(UV, self.params[2 * i], self.params[2 * i + 1],
                                       "tanh" if i < n - 1 else None)
        return UV



def test_exact_matches_autograd_reference_value_and_gradients(device):
    m = small_model().to(device)
    u = torch.randn(6, 2, dtype=torch.float64, device=device)
    params = list(m.ambient.parameters())
    res = logdet_jtj(m.decoder, u, "exact")
    ref = jacfwd_logdet_jtj(plain_decoder(m), u)   # J from torch.func.jacfwd, plain PyTorch
    torch.testing.assert_close(res.value, ref, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(res.value.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g, g_ref):
        rel = (a - b).norm() / b.norm().clamp(min=1e-300)
        assert rel <= 1e-8, rel


def grads(out, params):
    """Gradients with zeros for parameters the output does not depend on (e.g. the last bias,
    which does not change J)."""
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)]


def test_fast_path_equals_generic_path():
    dec = MirroredMLP([2, 16, 16, 5])
    plain = lambda v: dec(v)  # noqa: E731  (no jvp_packed: the generic torch.func path)
    u = torch.randn(5, 2, dtype=torch.float64)
    x1, J1 = decoder_jacobian(dec, u)
    x2, J2 = decoder_jacobian(plain, u)
    torch.testing.assert_close(x1, x2)
    torch.testing.assert_close(J1, J2, rtol=1e-10, atol=1e-12)
    a = logdet_jtj(dec, u, "exact").value
    b = logdet_jtj(plain, u, "exact").value
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    ga = grads(a.sum(), dec.params)
    gb = grads(b.sum(), dec.params)
    for x_, y_ in zip(ga, gb):
        torch.testing.assert_close(x_, y_, rtol=1e-9, atol=1e-11)
    h1 = logdet_jtj(dec, u, "hutchinson", probes=2, cg_rtol=1e-12,
                    generator=torch.Generator().manual_seed(5))
    h2 = logdet_jtj(plain, u, "hutchinson", probes=2, cg_rtol=1e-12,
                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(h1.value, h2.value, rtol=1e-8, atol=1e-10)
    g1 = grads(h1.value.sum(), dec.params)
    g2 = grads(h2.value.sum(), dec.params)
    for x_, y_ in zip(g1, g2):
        torch.testing.assert_close(x_, y_, rtol=1e-8, atol=1e-10)


def test_user_module_decoder_generic_path():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    u = torch.randn(5, 2, dtype=torch.float64)
    res = logdet_jtj(net, u, "exact")
    torch.testing.assert_close(res.value, jacfwd_logdet_jtj(net, u))
    g = grads(res.value.sum(), list(net.parameters()))
    g_ref = grads(jacfwd_logdet_jtj(net, u).sum(), list(net.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("probe", ["normal", "rademacher"])
def test_hutchinson_gradient_is_unbiased(probe):
    """Average of M single-probe gradients vs the exact gradient, within 4 standard errors."""
    m = small_model(D=4, d=3, seed=2)
    u = torch.randn(3, 3, dtype=torch.float64)
    params = list(m.ambient.parameters())
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    exact = flat(torch.autograd.grad(logdet_jtj(m.decoder, u, "exact").value.sum(), params))
    gen = torch.Generator().manual_seed(0)
    M = 400
    draws = torch.stack([
        flat(torch.autograd.grad(
            logdet_jtj(m.decoder, u, "hutchinson", probe=probe, cg_rtol=1e-10,
                       generator=gen).value.sum(), params))
        for _ in range(M)])
    mean, se = draws.mean(0), draws.std(0) / M ** 0.5
    z = (mean - exact).abs() / se.clamp(min=1e-12)
    # each coordinate within 4.5 standard errors (the max over ~hundreds of coordinates of |N(0,1)|)
    assert (z < 4.5).all(), z.max()
    # and the estimate really approaches the exact gradient (relative error shrinks like 1/√M)
    assert (mean - exact).norm() / exact.norm() < 0.25
    # the CG solves converged, so only probe noise is left
    res = logdet_jtj(m.decoder, u, "hutchinson", probe=probe, cg_rtol=1e-10)
    assert res.diagnostics["cg_converged"].all()


def test_hutchinson_many_probes_close_to_exact():
    m = small_model(D=5, d=2, seed=3)
    u = torch.randn(4, 2, dtype=torch.float64)
    params = list(m.ambient.parameters())
    exact = torch.autograd.grad(logdet_jtj(m.decoder, u, "exact").value.sum(), params)
    est = torch.autograd.grad(logdet_jtj(m.decoder, u, "hutchinson", probes=4000,
                                         cg_rtol=1e-12, generator=torch.Generator().manual_seed(1)
                                         ).value.sum(), params)
    num = sum(((a - b) ** 2).sum() for a, b in zip(est, exact)) ** 0.5
    den = sum((b ** 2).sum() for b in exact) ** 0.5
    assert num / den < 0.1


def test_errors():
    m = small_model()
    with pytest.raises(ValueError, match="method must be 'exact', 'hutchinson' or 'surrogate'"):
        logdet_jtj(m.decoder, torch.randn(2, 2, dtype=torch.float64), "sketch")
    with pytest.raises(ValueError, match="probe must be 'normal' or 'rademacher'"):
        logdet_jtj(m.decoder, torch.randn(2, 2, dtype=torch.float64), "hutchinson", probe="x")
    with pytest.raises(ValueError, match=r"u must be a tensor \(B, d\)"):
        logdet_jtj(m.decoder, torch.randn(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="probes must be a positive int"):
        logdet_jtj(m.decoder, torch.randn(2, 2, dtype=torch.float64), "hutchinson",
                   probes=0)


def test_model_decode_takes_the_fast_path_and_library_ops_under_torch_func_say_what_to_pass():
    from injflow_ext import RectangularFlow
    torch.manual_seed(0)
    m = RectangularFlow.tabular(4, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(8,)).double()
    u = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(logdet_jtj(m.decode, u).value, logdet_jtj(m.decoder, u).value)
    with pytest.raises(TypeError, match="pass a decoder with jvp_packed|Pass a decoder with"):
        logdet_jtj(lambda v: m.decode(v), u)
