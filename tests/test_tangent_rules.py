"""Tangent rules of plain torch.nn modules (injflow_ext.nn.tangent) against torch.func.jvp of
the same module in float64: values and parameter gradients; gradcheck; torch.compile; the
fallback's warning; errors; logdet_jtj taking the fast path for a plain module."""

import warnings

import pytest
import torch
from torch import nn

from injflow_ext.estimators import logdet_jtj
from injflow_ext.nn import (
    MLP,
    AffineCoupling,
    ElementwiseAffine,
    Residual,
    TangentRuleWarning,
    tangent,
)
from injflow_ext.nn import rules as rules_module


def reference_jvp(module, XV):
    """The primal and K tangents by torch.func.jvp, one tangent at a time."""
    x = XV[:, 0]
    outs = [torch.func.jvp(module, (x,), (XV[:, k],))[1] for k in range(1, XV.shape[1])]
    return torch.stack([module(x), *outs], dim=1)


def assert_rule_matches(module, in_shape, K=3, B=4, device="cpu", atol=1e-10):
    """jvp_packed of the rules equals torch.func.jvp, and so do the gradients of a random
    functional of the result with respect to the input and every parameter."""
    module = module.to(device=device, dtype=torch.float64)
    XV = torch.randn(B, 1 + K, *in_shape, dtype=torch.float64, device=device,
                     requires_grad=True)
    params = [p for p in module.parameters() if p.requires_grad]
    Y = tangent(module).jvp_packed(XV)
    R = reference_jvp(module, XV)
    assert Y.shape == R.shape
    torch.testing.assert_close(Y, R, atol=atol, rtol=1e-9)
    w = torch.randn_like(R)
    got = torch.autograd.grad((Y * w).sum(), [XV, *params], allow_unused=True)
    want = torch.autograd.grad((R * w).sum(), [XV, *params], allow_unused=True,
                               retain_graph=True)
    for g, r in zip(got, want):
        if r is None:
            assert g is None or float(g.abs().max()) == 0
        else:
            torch.testing.assert_close(g, r, atol=atol, rtol=1e-9)
    # the linearisation: the primal once (differentiable), then tangents without a primal row
    y0, lin = tangent(module).linearize(XV[:, 0])
    torch.testing.assert_close(y0, R[:, 0], atol=atol, rtol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(lin(XV[:, 1:]), R[:, 1:], atol=atol, rtol=1e-9)
    g0 = torch.autograd.grad((y0 * w[:, 0]).sum(), [XV, *params], allow_unused=True)
    r0 = torch.autograd.grad((R[:, 0] * w[:, 0]).sum(), [XV, *params], allow_unused=True)
    for g, r in zip(g0, r0):
        if r is not None:
            torch.testing.assert_close(g, r, atol=atol, rtol=1e-9)
    return Y


def mlp(acts, sizes=(5, 16, 16, 7)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(acts) and acts[i] is not None:
            layers.append(acts[i])
    return nn.Sequential(*layers)


ACTS = [nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.2), nn.ELU(0.7), nn.Softplus(), nn.SiLU(),
        nn.Sigmoid(), nn.GELU(), nn.GELU(approximate="tanh")]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
def test_mlp_of_each_activation(device, act):
    model = mlp([act, act, None])
    assert_rule_matches(model, (5,), device=device)
    plan = tangent(model).plan()
    if not isinstance(act, nn.GELU):        # one fused op for the whole network
        assert len(plan) == 1 and plan[0].startswith("tangent_mlp: 5 -> 16 -> 16 -> 7")


def test_mixed_activations_and_a_last_activation_split_into_runs(device):
    model = mlp([nn.Tanh(), nn.ReLU(), nn.Sigmoid()], sizes=(4, 8, 8, 8, 3))
    Y = assert_rule_matches(model, (4,), device=device)
    assert Y.shape == (4, 4, 3)
    plan = tangent(model).plan()
    assert len(plan) == 2 and "tanh, relu" in plan[0] and "(sigmoid, none)" in plan[1]
    # different slopes cannot share the op's one activation parameter
    model = mlp([nn.LeakyReLU(0.1), nn.LeakyReLU(0.3)], sizes=(4, 8, 8))
    assert_rule_matches(model, (4,), device=device)
    assert len(tangent(model).plan()) == 2


def test_linear_without_bias_and_consecutive_linears(device):
    model = nn.Sequential(nn.Linear(3, 6, bias=False), nn.Linear(6, 4), nn.Tanh(),
                          nn.Linear(4, 2, bias=False))
    assert_rule_matches(model, (3,), device=device)


def test_linear_on_extra_leading_dimensions(device):
    assert_rule_matches(nn.Sequential(nn.Linear(3, 5), nn.Tanh()), (2, 3), device=device)


def test_nested_sequential_identity_dropout_eval_and_residual(device):
    block = nn.Sequential(nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 6))
    model = nn.Sequential(nn.Linear(3, 6), nn.Identity(), nn.Dropout(0.5),
                          Residual(block), nn.Sequential(nn.Tanh(), Residual(
                              nn.Sequential(nn.Linear(6, 6), nn.ELU())), nn.Linear(6, 9)))
    model.eval()
    assert_rule_matches(model, (3,), device=device)
    plan = tangent(model).plan()
    assert not any("torch.func" in str(s) for s in plan)


def test_residual_zero_init_starts_as_identity():
    r = Residual(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)), zero_init=True)
    x = torch.randn(3, 4)
    torch.testing.assert_close(r(x), x)


def test_dropout_in_training_shares_one_mask_between_primal_and_tangents():
    model = nn.Sequential(nn.Linear(3, 50), nn.Dropout(0.5)).double().train()
    XV = torch.randn(4, 3, 3, dtype=torch.float64)
    Y = tangent(model).jvp_packed(XV)
    lin = model[0]
    Z = XV @ lin.weight.T + torch.cat([lin.bias.expand(4, 1, 50), torch.zeros(4, 2, 50,
                                                                           dtype=torch.float64)], 1)
    kept = Y[:, 0] != 0
    assert 0 < kept.float().mean() < 1
    for k in range(3):  # the same entries dropped in every row, the kept ones scaled by 2
        torch.testing.assert_close(Y[:, k], torch.where(kept, 2 * Z[:, k], 0 * Z[:, k]))


def test_conv_transposed_conv_flatten_unflatten(device):
    enc = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(4, 3, 3, padding="same"), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert_rule_matches(enc, (2, 8, 8), device=device)
    dec = nn.Sequential(nn.Linear(5, 4 * 4 * 4), nn.SiLU(), nn.Unflatten(1, (4, 4, 4)),
                        nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1), nn.Tanh(),
                        nn.Conv2d(3, 2, 1, groups=1), nn.Flatten(-3, -1))
    Y = assert_rule_matches(dec, (5,), device=device)
    assert Y.shape == (4, 4, 2 * 8 * 8)
    assert not any("torch.func" in s for s in tangent(dec).plan())


def test_standalone_activation_on_images(device):
    assert_rule_matches(nn.Sequential(nn.Softplus(), nn.GELU()), (2, 3, 3), device=device)


def test_elementwise_affine(device):
    a = ElementwiseAffine(torch.randn(4), torch.rand(4) + 0.5)
    assert_rule_matches(nn.Sequential(nn.Linear(3, 4), a), (3,), device=device)
    x = torch.randn(5, 4, dtype=torch.float64, device=device)
    torch.testing.assert_close(a.inverse_module()(a(x)), x)


def test_library_modules(device):
    coupling = AffineCoupling(6, (8,))
    with torch.no_grad():
        for p in coupling.parameters():
            p.normal_(0, 0.3)
    XV = torch.randn(3, 3, 6, dtype=torch.float64, device=device)
    coupling = coupling.to(device, torch.float64)
    torch.testing.assert_close(tangent(coupling).jvp_packed(XV), coupling.jvp_packed(XV))
    lib = MLP(4, 5, (8,), zero_last=False)
    net = nn.Sequential(nn.Linear(3, 4), lib, nn.Tanh()).to(device, torch.float64)
    plain = nn.Sequential(net[0], nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh())
    plain = plain.to(device, torch.float64)
    with torch.no_grad():
        for lin, W, b in zip((plain[1], plain[3]), lib.weights, lib.biases):
            lin.weight.copy_(W)
            lin.bias.copy_(b)
    XV = torch.randn(3, 4, 3, dtype=torch.float64, device=device)
    assert "MLP.forward_packed" in " ".join(tangent(net).plan())
    torch.testing.assert_close(tangent(net).jvp_packed(XV), reference_jvp(plain, XV))


class Bump(nn.Module):
    """A module without a rule."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return x * torch.sin(self.a * x)


def test_unknown_modules_fall_back_to_torch_func_and_warn_once_per_class(device):
    rules_module._WARNED.discard(Bump)
    rules_module._WARNED.discard(nn.LayerNorm)
    model = nn.Sequential(nn.Linear(3, 6), Bump(), nn.LayerNorm(6), Bump(), nn.Linear(6, 2),
                          nn.Softplus(beta=2.0))
    with pytest.warns(TangentRuleWarning) as record:
        assert_rule_matches(model, (3,), device=device)
    names = sorted(str(w.message).split(":")[1].split("(")[0].strip() for w in record
                   if issubclass(w.category, TangentRuleWarning))
    assert any("Bump" in n for n in names) and any("LayerNorm" in n for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TangentRuleWarning)
        tangent(nn.Sequential(Bump(), nn.LayerNorm(6))).jvp_packed(torch.randn(2, 2, 6))


def test_subclass_that_overrides_forward_is_not_taken_for_its_base():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    rules_module._WARNED.discard(Doubled)
    with pytest.warns(TangentRuleWarning, match="Doubled"):
        assert_rule_matches(nn.Sequential(Doubled(3, 4), nn.Tanh()), (3,))


def test_gradcheck_through_the_fused_run():
    model = mlp([nn.Tanh(), nn.SiLU()], sizes=(3, 5, 5, 2)).double()
    t = tangent(model)
    XV = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda XV: t.jvp_packed(XV), (XV,))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ELU(), nn.ConvTranspose2d(2, 1, 2,
                                                                                  stride=2))
    tc = tangent(conv.double())
    XI = torch.randn(1, 2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda XI: tc.jvp_packed(XI), (XI,))


def test_torch_compile(device):
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(),
                          Residual(nn.Sequential(nn.Linear(16, 16), nn.SiLU())),
                          nn.Linear(16, 6)).to(device)
    t = tangent(model)
    XV = torch.randn(8, 3, 4, device=device)
    compiled = torch.compile(lambda XV: t.jvp_packed(XV), fullgraph=True)
    torch.testing.assert_close(compiled(XV), t.jvp_packed(XV), atol=1e-5, rtol=1e-5)


def test_errors_name_the_module():
    t = tangent(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "decoder")
    with pytest.raises(ValueError, match=r"decoder\.0 .*takes 4 features.*\(5, 3\)"):
        t.jvp_packed(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="packed rows"):
        t.jvp_packed(torch.randn(5, 4))
    conv = tangent(nn.Sequential(nn.Conv2d(3, 2, 3)), "encoder")
    with pytest.raises(ValueError, match=r"encoder\.0 .*images \(B, 3, H, W\)"):
        conv.jvp_packed(torch.randn(2, 2, 1, 5, 5))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        tangent(lambda x: x)

    class UsesLibraryOps(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP(3, 3, (4,), zero_last=False)

        def forward(self, x):
            return self.mlp(x) * 2

    rules_module._WARNED.add(nn.BatchNorm1d)
    with pytest.raises(ValueError, match="changes its own state.*eval mode"):
        tangent(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()).jvp_packed(
            torch.randn(5, 3, 3))
    rules_module._WARNED.add(UsesLibraryOps)
    with pytest.raises(TypeError, match="jvp_packed"):
        tangent(UsesLibraryOps()).jvp_packed(torch.randn(2, 3, 3))


def test_logdet_jtj_takes_the_fast_path_for_a_plain_module(monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 7)).double()
    u = torch.randn(6, 3, dtype=torch.float64)
    generic = {m: logdet_jtj(lambda z: model(z), u, m, generator=torch.Generator().manual_seed(0),
                             probes=2).value for m in ("exact", "hutchinson")}
    params = list(model.parameters())
    grads = {m: torch.autograd.grad(v.sum(), params, allow_unused=True)
             for m, v in generic.items()}

    def forbidden(*args, **kwargs):
        raise AssertionError("the generic torch.func path ran")
    monkeypatch.setattr(torch.func, "jvp", forbidden)
    monkeypatch.setattr(torch.func, "jacfwd", forbidden)
    for m in ("exact", "hutchinson"):
        fast = logdet_jtj(model, u, m, generator=torch.Generator().manual_seed(0), probes=2).value
        torch.testing.assert_close(fast, generic[m].detach(), atol=1e-9, rtol=1e-7)
        for g, r in zip(torch.autograd.grad(fast.sum(), params, allow_unused=True), grads[m]):
            if r is None:   # J does not depend on the last bias
                assert g is None or float(g.abs().max()) == 0
            else:
                torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-7)


def test_logdet_jtj_of_a_decoder_of_images_sees_it_flat():
    torch.manual_seed(2)
    dec = nn.Sequential(nn.Linear(3, 4 * 2 * 2), nn.SiLU(), nn.Unflatten(1, (4, 2, 2)),
                        nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1)).double()
    u = torch.randn(5, 3, dtype=torch.float64)
    for method in ("exact", "hutchinson"):
        fast = logdet_jtj(dec, u, method, generator=torch.Generator().manual_seed(0))
        generic = logdet_jtj(lambda z: dec(z), u, method,
                             generator=torch.Generator().manual_seed(0))
        assert fast.decoded.shape == (5, 16)
        torch.testing.assert_close(fast.value, generic.value, atol=1e-9, rtol=1e-7)
