"""RectangularFlow: known-answer log_prob, losses of every method, two-step phases, sampling,
save/load round trip, bad arguments."""

import math

import numpy as np
import pytest
import torch
from reference import batched_jacobian

from injflow_ext import RectangularFlow
from injflow_ext.nn import InvertibleLinear, Sequential


def test_log_prob_with_rotation_ambient_is_prior_density():
    """h a rotation Q: J = Q[:, :d], JᵀJ = I, so log p(x) = log N(u; 0, I), u = (Qᵀx)[:d]."""
    torch.manual_seed(0)
    m = RectangularFlow(4, 2, ambient_layers=0, prior_layers=1, prior_hidden=(4,)).double().eval()
    m.ambient = Sequential(InvertibleLinear(4, seed=7)).double()
    Q = m.ambient[0].weight()
    x = torch.randn(9, 4, dtype=torch.float64)
    u = (x @ Q)[:, :2]
    expected = -0.5 * (u * u).sum(-1) - math.log(2 * math.pi)
    torch.testing.assert_close(m.encode(x), u)
    torch.testing.assert_close(m.log_prob(x), expected)
    # points on the manifold are projected onto themselves
    on = m.decode(u)
    torch.testing.assert_close(m.project(on), on)


def test_log_prob_matches_reference_formula():
    torch.manual_seed(1)
    m = RectangularFlow(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=2,
                        prior_hidden=(4,)).double()
    m.loss(torch.randn(64, 5, dtype=torch.float64))  # initialise ActNorm
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(6, 5, dtype=torch.float64)
    u = m.encode(x)
    J = batched_jacobian(m.decode, u)
    ref = m.prior_log_prob(u) - 0.5 * torch.logdet(J.mT @ J)
    torch.testing.assert_close(m.log_prob(x), ref)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_ml_losses_backprop(device, method):
    m = RectangularFlow(6, 2, ambient_layers=2, ambient_hidden=(16,), prior_layers=1,
                        prior_hidden=(8,)).to(device)
    x = torch.randn(32, 6, device=device)
    out = m.loss(x, method, beta=10.0)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    if method == "exact":
        assert out["logdet"] is not None and out["nll"] is not None
        # nll is −log p_U(u) + ½ log det JᵀJ, what log_prob gives
        torch.testing.assert_close(out["nll"], -m.log_prob(x).mean().detach(), rtol=1e-4, atol=1e-4)
    else:
        assert out["logdet"] is None and out["nll"] is None
        assert out["diagnostics"]["cg_iterations"].shape == (32, 1)


def test_two_step_phases_touch_their_own_parameters():
    m = RectangularFlow(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(4,))
    groups = m.parameter_groups()
    assert len(groups["ambient"]) + len(groups["prior"]) == len(list(m.parameters()))
    x = torch.randn(16, 5)
    m.loss(x, "two-step", phase="reconstruction")["loss"].backward()
    assert all(p.grad is None for p in groups["prior"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["ambient"])
    m.zero_grad(set_to_none=True)
    m.loss(x, "two-step", phase="likelihood")["loss"].backward()
    assert all(p.grad is None for p in groups["ambient"])
    assert any(p.grad is not None for p in groups["prior"])
    with pytest.raises(ValueError, match="phase='reconstruction' or 'likelihood'"):
        m.loss(x, "two-step")
    with pytest.raises(ValueError, match="phase is only for method='two-step'"):
        m.loss(x, "exact", phase="likelihood")
    with pytest.raises(ValueError,
                       match=r"method must be one of \['exact', 'hutchinson', 'surrogate', 'two-step'\]"):
        m.loss(x, "fast")


def test_sample_lies_on_manifold():
    torch.manual_seed(0)
    m = RectangularFlow(4, 1, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(4,)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = m.sample(20, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20, 4)
    torch.testing.assert_close(m.project(x), x, rtol=1e-9, atol=1e-9)


def test_a_few_steps_of_training_reduce_the_loss():
    torch.manual_seed(0)
    angle = torch.rand(256) * 2 * math.pi
    x = torch.stack([angle.cos(), angle.sin()], -1)
    m = RectangularFlow(2, 1, ambient_layers=3, ambient_hidden=(32, 32), prior_layers=2,
                        prior_hidden=(16,))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = m.loss(x, "exact", beta=10.0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < first


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = RectangularFlow(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(4,))
    x = torch.randn(10, 5)
    m.loss(x)  # initialise ActNorm from data
    m.eval()
    path = tmp_path / "model.pt"
    m.save(str(path))
    m2 = RectangularFlow.load(str(path))
    assert m2.config == m.config
    torch.testing.assert_close(m2.log_prob(x), m.log_prob(x))
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="not a file written by RectangularFlow.save"):
        torch.save({"x": 1}, tmp_path / "other.pt")
        RectangularFlow.load(str(tmp_path / "other.pt"))


def test_student_t_base_density_samples_and_quantile_map():
    """base="student-t": log p_Z is the product of t_ν densities (scipy), samples have its
    quantiles, the chart KL's quantile map sends normal quantiles to the t's, and a model with
    a rotation as h gives the base density on the manifold."""
    from scipy import stats

    from injflow_ext.evaluation import base_from_normal

    m = RectangularFlow(4, 2, ambient_layers=0, prior_layers=0, base="student-t",
                        base_dof=3).double().eval()
    z = torch.randn(50, 2, dtype=torch.float64) * 4
    torch.testing.assert_close(m.base_log_prob(z),
                               torch.as_tensor(stats.t.logpdf(z.numpy(), 3).sum(1)))
    m.ambient = Sequential(InvertibleLinear(4, seed=7)).double()
    x = m.decode(z)
    torch.testing.assert_close(m.log_prob(x), m.base_log_prob(z))
    s = m.sample_base(100000, torch.Generator().manual_seed(0)).numpy().ravel()
    q = [0.01, 0.1, 0.5, 0.9, 0.99]
    assert abs(np.quantile(s, q) - stats.t.ppf(q, 3)).max() < 0.15
    w = np.array([[-9.0, -1.0], [0.0, 2.5], [6.0, 9.0]])
    z_w = base_from_normal(m, w)
    np.testing.assert_allclose(stats.t.cdf(z_w, 3), stats.norm.cdf(w), rtol=1e-9)
    assert np.all(np.isfinite(z_w)) and z_w[2, 1] > 1e3       # far quantiles keep precision
    normal = RectangularFlow(4, 2, ambient_layers=0, prior_layers=0)
    assert base_from_normal(normal, w) is w


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(ambient_dim=3, latent_dim=2, base="cauchy"), "base must be 'normal' or 'student-t'"),
    (dict(ambient_dim=3, latent_dim=2, base_dof=2.5), "base_dof must be a positive int"),
    (dict(ambient_dim=3, latent_dim=3), "latent_dim must be smaller than ambient_dim"),
    (dict(ambient_dim=3, latent_dim=5), "latent_dim must be smaller than ambient_dim"),
    (dict(ambient_dim=3, latent_dim=0), "latent_dim must be a positive int"),
])
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        RectangularFlow(**kwargs)


def test_wrong_input_width():
    m = RectangularFlow(5, 2, ambient_layers=1, ambient_hidden=(4,), prior_layers=1,
                        prior_hidden=(4,))
    with pytest.raises(ValueError, match=r"must have 5 features .* got shape \(3, 4\)"):
        m.log_prob(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"decode: u must have 2 features"):
        m.decode(torch.randn(3, 3))
