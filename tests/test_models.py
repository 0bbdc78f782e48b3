"""RectangularFlow: known-answer log_prob, losses of every method, two-step phases, sampling,
save/load round trip (also of files of the version-1 format), a model composed from the user's
parts, bad arguments."""

import math

import numpy as np
import pytest
import torch
from reference import batched_jacobian

from injflow_ext import RectangularFlow, StudentT, TrainStep, make_objective
from injflow_ext.nn import ActNorm, AffineCoupling, InvertibleLinear, Permutation, Sequential


def test_log_prob_with_rotation_ambient_is_prior_density():
    """h a rotation Q: J = Q[:, :d], JᵀJ = I, so log p(x) = log N(u; 0, I), u = (Qᵀx)[:d]."""
    torch.manual_seed(0)
    m = RectangularFlow.tabular(4, 2, ambient_layers=0, prior_layers=1, prior_hidden=(4,)).double().eval()
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
    m = RectangularFlow.tabular(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=2,
                        prior_hidden=(4,)).double()
    m.initialize(torch.randn(64, 5, dtype=torch.float64))  # initialise ActNorm
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
    m = RectangularFlow.tabular(6, 2, ambient_layers=2, ambient_hidden=(16,), prior_layers=1,
                        prior_hidden=(8,)).to(device)
    x = torch.randn(32, 6, device=device)
    out = make_objective(method, beta=10.0).loss(m, x)
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
    m = RectangularFlow.tabular(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(4,))
    groups = m.parameter_groups()
    assert len(groups["manifold"]) + len(groups["prior"]) == len(list(m.parameters()))
    x = torch.randn(16, 5)
    two_step = make_objective("two-step")
    two_step.loss(m, x, "reconstruction")["loss"].backward()
    assert all(p.grad is None for p in groups["prior"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["manifold"])
    m.zero_grad(set_to_none=True)
    two_step.loss(m, x, "likelihood")["loss"].backward()
    assert all(p.grad is None for p in groups["manifold"])
    assert any(p.grad is not None for p in groups["prior"])
    with pytest.raises(ValueError, match=r"phase must be one of \['reconstruction', 'likelihood'\]"):
        two_step.loss(m, x, "all")
    with pytest.raises(ValueError, match=r"phase must be one of \['all'\]"):
        make_objective("exact").loss(m, x, "likelihood")
    with pytest.raises(ValueError, match=r"unknown objective 'fast'; expected one of \['exact', "
                       r"'hutchinson', 'surrogate', 'two-step'"):
        make_objective("fast")


def test_sample_lies_on_manifold():
    torch.manual_seed(0)
    m = RectangularFlow.tabular(4, 1, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
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
    m = RectangularFlow.tabular(2, 1, ambient_layers=3, ambient_hidden=(32, 32), prior_layers=2,
                        prior_hidden=(16,))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = make_objective("exact", beta=10.0).loss(m, x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < first


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = RectangularFlow.tabular(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                        prior_hidden=(4,))
    x = torch.randn(10, 5)
    m.initialize(x)  # initialise ActNorm from data
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
    """base=StudentT: log p_Z is the product of t_ν densities (scipy), samples have its
    quantiles, the chart KL's quantile map sends normal quantiles to the t's, and a model with
    a rotation as h gives the base density on the manifold."""
    from scipy import stats

    from injflow_ext.evaluate.evaluation import base_from_normal

    m = RectangularFlow.tabular(4, 2, ambient_layers=0, prior_layers=0,
                                base=StudentT(2, dof=3)).double().eval()
    z = torch.randn(50, 2, dtype=torch.float64) * 4
    torch.testing.assert_close(m.base.log_prob(z),
                               torch.as_tensor(stats.t.logpdf(z.numpy(), 3).sum(1)))
    m.ambient = Sequential(InvertibleLinear(4, seed=7)).double()
    x = m.decode(z)
    torch.testing.assert_close(m.log_prob(x), m.base.log_prob(z))
    s = m.base.sample((100000,), torch.Generator().manual_seed(0)).numpy().ravel()
    q = [0.01, 0.1, 0.5, 0.9, 0.99]
    assert abs(np.quantile(s, q) - stats.t.ppf(q, 3)).max() < 0.15
    w = np.array([[-9.0, -1.0], [0.0, 2.5], [6.0, 9.0]])
    z_w = base_from_normal(m, w)
    np.testing.assert_allclose(stats.t.cdf(z_w, 3), stats.norm.cdf(w), rtol=1e-9)
    assert np.all(np.isfinite(z_w)) and z_w[2, 1] > 1e3       # far quantiles keep precision
    normal = RectangularFlow.tabular(4, 2, ambient_layers=0, prior_layers=0)
    assert base_from_normal(normal, w) is w


@pytest.mark.parametrize("build,pattern", [
    (lambda: RectangularFlow.tabular(3, 2, base="student-t"), "got the string 'student-t'"),
    (lambda: StudentT(2, dof=2.5), "dof must be a positive int"),
    (lambda: RectangularFlow.tabular(3, 2, base=StudentT(3)), r"over R\^2 .* got one over R\^3"),
    (lambda: RectangularFlow.tabular(3, 3), "latent_dim must be smaller than ambient_dim"),
    (lambda: RectangularFlow.tabular(3, 5), "latent_dim must be smaller than ambient_dim"),
    (lambda: RectangularFlow.tabular(3, 0), "latent_dim must be a positive int"),
    (lambda: RectangularFlow(Sequential(ActNorm(3)), 3), "latent_dim must be smaller"),
    (lambda: RectangularFlow(Sequential(ActNorm(3)), 1, Sequential(ActNorm(2))),
     r"prior must be a bijection of R\^1"),
    (lambda: RectangularFlow(torch.nn.Linear(3, 3), 1), "ambient must be an injflow_ext.nn.Bijection"),
    (lambda: RectangularFlow(Sequential(ActNorm(3)), 1, data_shape=(2, 2)),
     r"must agree, got ambient.n=3, prod\(data_shape\)=4"),
    (lambda: RectangularFlow(Sequential(ActNorm(3)), 1, base=torch.distributions.Normal(0.0, 1.0)),
     r"event_shape \(d,\)"),
])
def test_bad_arguments(build, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        build()


def _composed(dtype=torch.float64):
    """What a user composes: their own Sequential of library bijections as h, no prior flow, a
    torch.distributions normal as the base."""
    torch.manual_seed(3)
    h = Sequential(ActNorm(4), AffineCoupling(4, (16,)), Permutation(4, seed=1),
                   AffineCoupling(4, (16,)))
    base = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype)), 1)
    return RectangularFlow(h, 2, prior=None, base=base).to(dtype)


def test_composed_model_log_prob_is_the_change_of_variables():
    """log p(x) = log N(u) − ½ log det JᵀJ at u = enc(x), J = ∂g/∂u by autograd (no prior flow:
    p_U is the base)."""
    m = _composed()
    x = torch.randn(7, 4, dtype=torch.float64)
    m.initialize(x)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    m.eval()
    u = m.encode(x)
    J = batched_jacobian(m.decode, u)
    ref = (-0.5 * (u * u).sum(-1) - math.log(2 * math.pi)) - 0.5 * torch.logdet(J.mT @ J)
    torch.testing.assert_close(m.log_prob(x), ref)
    assert m.sample(5).shape == (5, 4)
    torch.testing.assert_close(m.generate(u), m.decode(u))   # no prior: u = z


@pytest.mark.parametrize("method", ["exact", "hutchinson", "surrogate"])
def test_composed_model_trains_with_train_step(method):
    m = _composed()
    g = torch.Generator().manual_seed(0)
    angle = torch.rand(128, generator=g, dtype=torch.float64) * 6.28
    x = torch.stack([angle.cos(), angle.sin(), 0.1 * angle.cos(), 0.0 * angle], -1)
    m.initialize(x)
    step = TrainStep(m, method, lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    losses = [float(step(x, generator=torch.Generator().manual_seed(i))["loss"]) for i in range(25)]
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    with pytest.raises(ValueError, match="has none"):
        TrainStep(m, "two-step")


def test_composed_model_saves_its_state_dict(tmp_path):
    """A user-composed model is rebuilt by its user and loads a state_dict; save() says so."""
    m = _composed()
    x = torch.randn(9, 4, dtype=torch.float64)
    m.initialize(x)
    torch.save(m.state_dict(), tmp_path / "weights.pt")
    m2 = _composed()
    m2.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True))
    torch.testing.assert_close(m2.log_prob(x), m.log_prob(x))
    with pytest.raises(ValueError, match="composed from your own parts"):
        m.save(str(tmp_path / "model.pt"))


def test_version_1_model_files_load(tmp_path):
    """A model.pt of the constructor-kwargs format (every run directory before 2026-12) loads
    into the same modules: same state_dict keys, same log_prob."""
    torch.manual_seed(0)
    m = RectangularFlow.tabular(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                                prior_hidden=(4,), permutation="reverse", base=StudentT(2, 4))
    m.initialize(torch.randn(10, 5))
    m.eval()
    v1 = dict(ambient_dim=5, latent_dim=2, ambient_layers=2, ambient_hidden=[8], prior_layers=1,
              prior_hidden=[4], prior_spline_bins=0, activation="tanh", scale="tanh",
              actnorm=True, seed=0, permutation="reverse", base="student-t", base_dof=4,
              image_shape=None, image_levels=2, image_hidden=[32, 32], image_activation="relu",
              logit_alpha=None, data_shift=None, data_scale=None)
    torch.save({"format": "injflow_ext.RectangularFlow/1", "config": v1,
                "state_dict": m.state_dict()}, tmp_path / "v1.pt")
    m1 = RectangularFlow.load(str(tmp_path / "v1.pt"))
    assert m1.config == m.config
    x = torch.randn(6, 5)
    torch.testing.assert_close(m1.log_prob(x), m.log_prob(x))


def test_builders_make_the_same_model_from_the_same_seed():
    """The builder constructs h, then f, in the order of every earlier version (the tabular
    defaults are those of `injflow train`: 8 couplings of 64-64 for D <= 8)."""
    torch.manual_seed(0)
    m = RectangularFlow.tabular(2, 1)
    assert m.config["ambient_layers"] == 8 and m.config["ambient_hidden"] == [64, 64]
    names = [n for n, _ in m.named_parameters()]
    assert names[0].startswith("ambient.layers.") and names[-1].startswith("prior.layers.")


def test_wrong_input_width():
    m = RectangularFlow.tabular(5, 2, ambient_layers=1, ambient_hidden=(4,), prior_layers=1,
                        prior_hidden=(4,))
    with pytest.raises(ValueError, match=r"must have 5 features .* got shape \(3, 4\)"):
        m.log_prob(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"decode: u must have 2 features"):
        m.decode(torch.randn(3, 3))
