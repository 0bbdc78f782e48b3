"""Under torch.autocast every op runs in float32: low-precision inputs are cast up, float64
stays float64, and a whole model's loss and gradients work under autocast (no dtype errors in
the middle of a model)."""

import pytest
import torch

from injflow_ext import (
    RectangularFlow,
    cg_solve,
    gram_logdet,
    make_objective,
    tangent_coupling_packed,
    tangent_linear_packed,
    tangent_mlp,
)

LOW = [torch.bfloat16, torch.float16]


def _autocast(device, dtype):
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@pytest.mark.parametrize("low", LOW)
def test_ops_run_in_float32_under_autocast(device, low):
    kw = dict(device=device)
    XV = torch.randn(4, 3, 5, **kw).to(low)
    W, b = torch.randn(6, 5, **kw), torch.randn(6, **kw)
    ST = torch.randn(4, 3, 10, **kw).to(low)
    J = torch.randn(4, 7, 3, **kw).to(low)
    A = torch.randn(4, 3, 3, **kw)
    A = (A @ A.transpose(1, 2) + 3 * torch.eye(3, **kw)).to(low)
    rhs = torch.randn(4, 3, **kw).to(low)
    with _autocast(device, low):
        outs = [tangent_linear_packed(XV, W.to(low), b, "tanh"),
                tangent_mlp(XV, [W, torch.randn(2, 6, **kw).to(low)], None, "tanh"),
                *tangent_coupling_packed(XV, ST), gram_logdet(J),
                cg_solve(A, rhs).x]
        direct = torch.ops.injflow.tangent_linear.default(XV, W.to(low), b, 1, 0.0)[0]
    up = [t.float() for t in (XV, ST, J, A, rhs)]
    refs = [tangent_linear_packed(up[0], W.to(low).float(), b, "tanh"), None,
            *tangent_coupling_packed(up[0], up[1]), gram_logdet(up[2]),
            cg_solve(up[3], up[4]).x]
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32
        if ref is not None:
            torch.testing.assert_close(out, ref)
    assert direct.dtype == torch.float32
    torch.testing.assert_close(direct, refs[0])


def test_float64_stays_float64_under_autocast(device):
    XV = torch.randn(3, 2, 4, dtype=torch.float64, device=device)
    W = torch.randn(5, 4, dtype=torch.float64, device=device)
    with _autocast(device, torch.bfloat16):
        Y = tangent_linear_packed(XV, W, None, "tanh")
        ld = gram_logdet(torch.randn(3, 5, 2, dtype=torch.float64, device=device))
    assert Y.dtype == torch.float64 and ld.dtype == torch.float64


def test_low_precision_outside_autocast_is_a_clear_error():
    with pytest.raises(TypeError, match="XV must be float32 or float64, got torch.bfloat16"):
        tangent_linear_packed(torch.randn(2, 1, 3).bfloat16(), torch.randn(4, 3).bfloat16())


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_model_loss_and_gradients_under_autocast(device, method):
    torch.manual_seed(0)
    model = RectangularFlow.tabular(4, 2, ambient_layers=2, ambient_hidden=(16,), prior_layers=1,
                            prior_hidden=(8,)).to(device)
    x = torch.randn(32, 4, device=device)
    model.initialize(x)  # ActNorm initialisation outside autocast
    with _autocast(device, torch.bfloat16):
        loss = make_objective(method, beta=10.0).loss(model, x)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    if method == "exact":  # the same loss as without autocast, up to bf16 rounding of plain matmuls
        plain = make_objective(method, beta=10.0).loss(model, x)["loss"]
        torch.testing.assert_close(loss, plain, rtol=5e-2, atol=5e-2)
