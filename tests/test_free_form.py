"""FreeFormFlow and FIF's loss: the loss and its gradients equal vislearn/FFF's way of computing
them (injflow_ext.benchmarks.fif_reference) in float64 with the same probes; the surrogate's
value is tr(f′g′) with K = d orthonormal probes; log_prob is the exact change of variables of
the decoder at f(x); every objective trains it through TrainStep; save/load/resume; errors."""

import math

import pytest
import torch
from torch import nn

from injflow_ext import FifObjective, FreeFormFlow, TrainStep, make_objective
from injflow_ext.benchmarks.fif_reference import fif_reference_loss
from injflow_ext.estimators import encoder_volume_surrogate, orthonormal_probes
from injflow_ext.flows import InjectiveFlow, RectangularFlow, StudentT, prior_flow


def small_model(D=5, d=2, prior=False, dtype=torch.float64):
    enc = nn.Sequential(nn.Linear(D, 16), nn.SiLU(), nn.Linear(16, 16), nn.Tanh(),
                        nn.Linear(16, d))
    dec = nn.Sequential(nn.Linear(d, 16), nn.ELU(), nn.Linear(16, 16), nn.SiLU(),
                        nn.Linear(16, D))
    f = prior_flow(d, 2, (8,)) if prior else None
    m = FreeFormFlow(enc, dec, d, prior=f).to(dtype)
    if prior:
        m.initialize(torch.randn(32, D, dtype=dtype))
    return m


@pytest.mark.parametrize("noise,K,prior", [(0.0, 1, False), (0.3, 2, True)])
def test_fif_loss_and_gradients_match_fff_code(noise, K, prior):
    m = small_model(prior=prior)
    x = torch.randn(12, 5, dtype=torch.float64)
    obj = FifObjective(beta=7.0, probes=K, noise=noise)
    ours = obj.loss(m, x, generator=torch.Generator().manual_seed(3))["loss"]
    params = list(m.parameters())
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    # the reference, with the noise and probes drawn in the same order from the same seed
    gen = torch.Generator().manual_seed(3)
    x_noisy = x + noise * torch.randn(x.shape, dtype=x.dtype, generator=gen) if noise else x
    v = orthonormal_probes(12, K, 2, x, gen)
    ref = fif_reference_loss(x_noisy, m.encoder_net, m.decoder_net, m.prior_log_prob, 7.0, v)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_ours, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_the_volume_gradient_goes_to_the_encoder_and_the_decoder_learns_from_reconstruction():
    m = small_model()
    x = torch.randn(8, 5, dtype=torch.float64)
    res = encoder_volume_surrogate(m.encoder, m.decoder, x, probes=2)
    dec = list(m.decoder_net.parameters())
    assert all(g is None for g in torch.autograd.grad(res.value.sum(), dec, allow_unused=True))
    enc = list(m.encoder_net.parameters())
    assert any(g is not None and float(g.abs().max()) > 0
               for g in torch.autograd.grad(res.value.sum(), enc, allow_unused=True))


def test_surrogate_value_is_the_trace_with_d_orthonormal_probes():
    m = small_model(D=6, d=3)
    x = torch.randn(4, 6, dtype=torch.float64)
    res = encoder_volume_surrogate(m.encoder, m.decoder, x, probes=3,
                                   generator=torch.Generator().manual_seed(0))
    for i in range(4):
        F = torch.autograd.functional.jacobian(lambda xi: m.encoder_net(xi[None])[0], x[i])
        z = m.encoder_net(x[i:i + 1])[0]
        G = torch.autograd.functional.jacobian(lambda zi: m.decoder_net(zi[None])[0], z)
        torch.testing.assert_close(res.value[i], torch.trace(F @ G), atol=1e-10, rtol=1e-9)


def test_log_prob_is_the_exact_change_of_variables_of_the_decoder_at_the_encoding():
    m = small_model(prior=True)
    x = torch.randn(6, 5, dtype=torch.float64)
    lp = m.log_prob(x)
    for i in range(6):
        u = m.encoder_net(x[i:i + 1])
        J = torch.autograd.functional.jacobian(lambda ui: m.decoder_net(ui[None])[0], u[0])
        want = m.prior_log_prob(u)[0] - 0.5 * torch.logdet(J.T @ J)
        torch.testing.assert_close(lp[i], want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(m.project(x), m.decoder_net(m.encoder_net(x)))
    torch.testing.assert_close(m.decode(m.encode(x)), m.project(x))
    z = torch.randn(3, 2, dtype=torch.float64)
    torch.testing.assert_close(m.generate(z), m.decoder_net(m.prior(z)[0]))
    assert m.sample(7, torch.Generator().manual_seed(0)).shape == (7, 5)


@pytest.mark.parametrize("method", ["fif", "exact", "hutchinson", "surrogate", "two-step"])
def test_every_objective_trains_a_free_form_model(method):
    torch.manual_seed(0)
    m = small_model(prior=True, dtype=torch.float32)
    x = torch.randn(64, 5)
    step = TrainStep(m, method, lr=3e-3)
    first = float(step(x)["loss"])
    for _ in range(30):
        out = step(x)
    assert torch.isfinite(out["loss"]) and float(out["skipped"]) == 0
    assert float(out["loss"]) < first


def test_compiled_step_of_fif_matches_eager():
    torch.manual_seed(0)
    a, b = small_model(dtype=torch.float32), None
    b = small_model(dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(32, 5)
    eager = TrainStep(a, make_objective("fif", probes=2, probe="orthonormal"), lr=1e-2)
    compiled = TrainStep(b, make_objective("fif", probes=2, probe="orthonormal"), lr=1e-2,
                         mode="compiled")
    torch.manual_seed(1)
    la = [float(eager(x)["loss"]) for _ in range(3)]
    torch.manual_seed(1)
    lb = [float(compiled(x)["loss"]) for _ in range(3)]
    # K = d orthonormal probes: the surrogate is the exact trace, whatever the draw
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-4)


def test_builders_save_load_and_images(tmp_path):
    m = FreeFormFlow.mlp(6, 2, hidden=(16,), blocks=2, prior_layers=1, base=StudentT(2, 5),
                         data_shift=[0.1] * 6, data_scale=[2.0] * 6)
    x = torch.randn(5, 6)
    m.save(tmp_path / "m.pt")
    back = InjectiveFlow.load(tmp_path / "m.pt")
    assert isinstance(back, FreeFormFlow) and isinstance(back.base, StudentT)
    torch.testing.assert_close(back.log_prob(x), m.log_prob(x))
    assert FreeFormFlow.load(tmp_path / "m.pt").latent_dim == 2
    with pytest.raises(ValueError, match="holds a FreeFormFlow; load it with FreeFormFlow.load"):
        RectangularFlow.load(tmp_path / "m.pt")
    # the fixed standardisation is the data end of both networks
    assert not any("torch.func" in str(s) for s in
                   __import__("injflow_ext").nn.tangent(m.decoder_net).plan())
    img = FreeFormFlow.images((1, 8, 8), 3, channels=(4, 8), hidden=(16,))
    xi = torch.rand(4, 1, 8, 8)
    assert img.encode(xi).shape == (4, 3) and img.project(xi).shape == (4, 1, 8, 8)
    assert img.log_prob(xi).shape == (4,) and torch.isfinite(img.log_prob(xi)).all()
    assert torch.equal(img.log_prob(xi), img.log_prob(xi.reshape(4, -1)))
    out = TrainStep(img, "fif", lr=1e-3)(xi)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="divisible by 4"):
        FreeFormFlow.images((1, 6, 6), 3, channels=(4, 8))


def test_errors_say_what_is_wrong():
    enc = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    dec = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"latent dimensions differ: the decoder takes \(B, 2\) "
                       r"\(latent_dim=2\) and the encoder returns \(3,\)"):
        FreeFormFlow(enc, dec, 2)
    with pytest.raises(ValueError, match=r"the decoder cannot take latents \(B, 3\)"):
        FreeFormFlow(enc, dec, 3)
    with pytest.raises(ValueError, match="decoder returns points of shape"):
        FreeFormFlow(nn.Linear(5, 2), dec, 2, data_shape=(2, 3))
    with pytest.raises(TypeError, match="encoder must be a torch.nn.Module"):
        FreeFormFlow(lambda x: x, dec, 2)
    with pytest.raises(ValueError, match="latent_dim must be smaller"):
        FreeFormFlow(nn.Linear(2, 2), nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match=r"must be \(B, 5\)|5 features"):
        FreeFormFlow(nn.Linear(5, 2), dec, 2).log_prob(torch.randn(3, 4))
    rect = RectangularFlow.tabular(4, 2, ambient_layers=1, ambient_hidden=(4,), prior_layers=0)
    with pytest.raises(ValueError, match="needs an encoder network with tangents"):
        TrainStep(rect, "fif")
    with pytest.raises(ValueError, match="K <= d = 2"):
        TrainStep(FreeFormFlow(nn.Linear(5, 2), dec, 2), make_objective("fif", probes=3))


def test_non_finite_training_data_is_refused_by_the_builder():
    import numpy as np

    from injflow_ext.flows import for_data
    x = np.random.default_rng(0).normal(size=(50, 4))
    x[7, 2] = np.nan
    for kind in ("free-form", "rectangular"):
        with pytest.raises(ValueError, match=r"1 rows with NaN or inf values \(first rows: \[7\]\)"):
            for_data(x, 2, kind=kind)


def test_modes_of_the_networks_are_kept_and_shape_inference_does_not_train():
    dec = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    enc = nn.Sequential(nn.Linear(5, 2))
    before = dec[1].running_mean.clone()
    m = FreeFormFlow(enc, dec, 2)
    assert dec.training and enc.training and torch.equal(dec[1].running_mean, before)
    assert m.data_shape == (5,) and m.ambient_dim == 5 and math.prod(m.data_shape) == 5


def test_on_each_device_fif_matches_the_reference_and_a_captured_step_trains(device):
    m = small_model(prior=True).to(device)
    x = torch.randn(16, 5, dtype=torch.float64, device=device)
    ours = FifObjective(probes=2).loss(m, x, generator=torch.Generator(device).manual_seed(0))
    v = orthonormal_probes(16, 2, 2, x, torch.Generator(device).manual_seed(0))
    ref = fif_reference_loss(x, m.encoder_net, m.decoder_net, m.prior_log_prob, 10.0, v)
    torch.testing.assert_close(ours["loss"], ref, atol=1e-11, rtol=1e-9)
    m32 = small_model(dtype=torch.float32).to(device)
    x32 = torch.randn(64, 5, device=device)
    mode = "captured" if device.type == "cuda" else "eager"
    step = TrainStep(m32, "fif", lr=3e-3, mode=mode, example_x=x32)
    first = float(step(x32)["loss"])
    for _ in range(20):
        out = step(x32)
    assert float(out["loss"]) < first and float(out["skipped"]) == 0
