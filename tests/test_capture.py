"""CapturedStep: a whole training step replayed from a CUDA graph on a GPU, the same step run
eagerly on the CPU. The eager fallback must train exactly like a hand-written loop; on a GPU
the replayed step must match the eager one, and building it must not train the model."""

import copy

import pytest
import torch

from injflow_ext import CapturedStep, RectangularFlow

CUDA = pytest.mark.skipif(not (torch.cuda.is_available()
                               and __import__("injflow_ext").build_info()["cuda_compiled"]),
                          reason="needs a GPU and an extension built with CUDA kernels")


def small_model(device="cpu", dtype=torch.float64):
    torch.manual_seed(0)
    m = RectangularFlow(6, 2, ambient_layers=2, ambient_hidden=(16, 16), prior_layers=1,
                        prior_hidden=(8,)).to(device=device, dtype=dtype)
    m.loss(torch.randn(64, 6, device=device, dtype=dtype))   # ActNorm initialisation
    return m


def batches(n, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 6, generator=g, dtype=dtype).to(device) for _ in range(n)]


def manual_steps(model, xs, weights, capturable=False):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=capturable)
    losses = []
    for x, w in zip(xs, weights):
        opt.zero_grad(set_to_none=True)
        out = model.loss(x, "exact", beta=10.0, likelihood_weight=w)
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses


def captured_steps(model, xs, weights, capturable=False, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=capturable)
    step = CapturedStep(model, opt, xs[0], method="exact", beta=10.0, **kw)
    return step, [float(step(x, likelihood_weight=w)["loss"]) for x, w in zip(xs, weights)]


def test_cpu_falls_back_to_the_eager_step_and_trains_the_same():
    xs, ws = batches(4), [0.0, 0.5, 1.0, 1.0]
    a, b = small_model(), small_model()
    ref = manual_steps(a, xs, ws)
    step, got = captured_steps(b, xs, ws)
    assert not step.captured and "CUDA device" in step.reason
    assert got == pytest.approx(ref, rel=1e-12)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=k)


def test_compiled_step_on_cpu_trains_like_the_eager_loop():
    """compile=True: the first step runs uncompiled, the rest through torch.compile (inductor's
    generated C++ on the CPU); the losses and weights follow the hand-written loop."""
    xs, ws = batches(4), [0.0, 0.5, 1.0, 1.0]
    a, b = small_model(), small_model()
    ref = manual_steps(a, xs, ws)
    step, got = captured_steps(b, xs, ws, compile=True)
    assert step.compiled_forward is not None and not step.captured
    assert got == pytest.approx(ref, rel=1e-9)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-8, atol=1e-10, msg=k)


def test_outputs_and_loss_only_mode():
    m = small_model()
    x = batches(1)[0]
    step = CapturedStep(m, None, x, method="hutchinson", beta=10.0)
    out = step(x)
    assert set(out) >= {"loss", "prior_nll", "reconstruction", "diagnostics.cg_iterations"}
    assert all(p.grad is not None for p in m.parameters())


def test_bad_arguments_say_what_to_change():
    m = small_model()
    x = batches(1)[0]
    step = CapturedStep(m, None, x)
    with pytest.raises(ValueError, match=r"shape of the captured batch \(32, 6\), got \(31, 6\)"):
        step(x[:31])
    with pytest.raises(ValueError, match="torch.float64 on cpu, got torch.float32"):
        step(x.float())
    with pytest.raises(ValueError, match="method must be 'exact', 'hutchinson' or 'surrogate'"):
        CapturedStep(m, None, x, method="two-step")
    with pytest.raises(ValueError, match="example_x must be a tensor of shape"):
        CapturedStep(m, None, x[0])
    with pytest.raises(TypeError, match="give loss_fn"):
        CapturedStep(torch.nn.Linear(6, 6), None, x)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        CapturedStep(m, None, x, compile="yes")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_replay_matches_eager_and_construction_does_not_train(dtype):
    xs, ws = batches(5, "cuda", dtype), [0.0, 0.3, 1.0, 1.0, 1.0]
    a, b = small_model("cuda", dtype), small_model("cuda", dtype)
    before = copy.deepcopy(b.state_dict())
    opt = torch.optim.Adam(b.parameters(), lr=1e-2, capturable=True)
    step = CapturedStep(b, opt, xs[0], method="exact", beta=10.0)
    assert step.captured
    for k, v in b.state_dict().items():   # the warm-up steps were undone
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    ref = manual_steps(a, xs, ws, capturable=True)
    got = [float(step(x, likelihood_weight=w)["loss"]) for x, w in zip(xs, ws)]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert got == pytest.approx(ref, rel=tol)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol, msg=k)


@CUDA
def test_cuda_compiled_replay_matches_eager():
    xs, ws = batches(3, "cuda", torch.float32), [0.3, 1.0, 1.0]
    a, b = small_model("cuda", torch.float32), small_model("cuda", torch.float32)
    before = copy.deepcopy(b.state_dict())
    opt = torch.optim.Adam(b.parameters(), lr=1e-2, capturable=True)
    step = CapturedStep(b, opt, xs[0], method="exact", beta=10.0, compile=True)
    assert step.captured and step.compiled_forward is not None
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    ref = manual_steps(a, xs, ws, capturable=True)
    got = [float(step(x, likelihood_weight=w)["loss"]) for x, w in zip(xs, ws)]
    assert got == pytest.approx(ref, rel=1e-4)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=k)
    with pytest.raises(ValueError, match="records CUDA graphs of its own"):
        CapturedStep(b, opt, xs[0], compile={"mode": "reduce-overhead"})


@CUDA
def test_cuda_hutchinson_replays_with_fresh_probes():
    m = small_model("cuda", torch.float32)
    x = batches(1, "cuda", torch.float32)[0]
    step = CapturedStep(m, None, x, method="hutchinson", beta=10.0)
    g1 = [p.grad.clone() for p in m.parameters()]
    step(x)
    g2 = [p.grad.clone() for p in m.parameters()]
    step(x)
    g3 = [p.grad.clone() for p in m.parameters()]
    assert all(torch.isfinite(g).all() for g in g3)
    # same batch and weights, new probes: the stochastic gradient changes between replays
    assert any(not torch.equal(a, b) for a, b in zip(g2, g3)) or any(
        not torch.equal(a, b) for a, b in zip(g1, g2))


@CUDA
def test_cuda_non_capturable_optimizer_is_refused():
    m = small_model("cuda", torch.float32)
    x = batches(1, "cuda", torch.float32)[0]
    with pytest.raises(ValueError, match="capturable=True"):
        CapturedStep(m, torch.optim.Adam(m.parameters()), x)
