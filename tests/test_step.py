"""TrainStep: the one training step of the library. Eager steps train bit-identically to a
hand-written loop for every objective; non-finite steps are skipped on the device; the compiled
mode trains like the eager one; on CUDA the captured replay matches the eager step and building
it does not train the model."""

import pytest
import torch
from conftest import _cuda_usable

from injflow_ext import RectangularFlow, TrainStep
from injflow_ext.train.objectives import (
    ExactObjective,
    HutchinsonObjective,
    SurrogateObjective,
    TwoStepObjective,
    make_objective,
)
from injflow_ext.train.step import resolve_mode

needs_cuda = pytest.mark.skipif(not _cuda_usable(),
                                reason="needs a GPU and an extension built with CUDA kernels")


def small_model(device="cpu", dtype=torch.float64):
    torch.manual_seed(0)
    m = RectangularFlow.tabular(6, 2, ambient_layers=2, ambient_hidden=(16,), prior_layers=1,
                        prior_hidden=(8,)).to(device=device, dtype=dtype)
    m.initialize(torch.randn(64, 6, device=device, dtype=dtype))  # ActNorm initialisation
    return m


def batches(n, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(32, 6, generator=g).to(device=device, dtype=dtype) for _ in range(n)]


OBJECTIVES = {"exact": lambda: ExactObjective(beta=10.0),
              "hutchinson": lambda: HutchinsonObjective(beta=10.0, probes=2),
              "surrogate": lambda: SurrogateObjective(beta=10.0, probes=2),
              "two-step": lambda: TwoStepObjective(beta=10.0)}


def hand_written(model, objective, xs, weights, seed=3):
    """The loop a user writes: per phase zero_grad, loss, backward, Adam step."""
    groups = objective.parameter_groups(model)
    opts = {ph: torch.optim.Adam(groups[ph], lr=1e-2, fused=True) for ph in objective.phases}
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for x, w in zip(xs, weights):
        total = 0.0
        for ph in objective.phases:
            opts[ph].zero_grad(set_to_none=True)
            out = objective.loss(model, x, ph, w, gen)
            out["loss"].backward()
            opts[ph].step()
            total += float(out["loss"].detach())
        losses.append(total)
    return losses


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_eager_step_trains_bit_identically_to_a_hand_written_loop(name):
    xs, ws = batches(4), [0.0, 0.5, 1.0, 1.0]
    a, b = small_model(), small_model()
    ref = hand_written(a, OBJECTIVES[name](), xs, ws)
    step = TrainStep(b, OBJECTIVES[name](), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    got = [float(step(x, likelihood_weight=w, generator=gen)["loss"]) for x, w in zip(xs, ws)]
    assert got == ref
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


@pytest.mark.parametrize("name", ["exact", "two-step"])
def test_non_finite_step_is_skipped_on_the_device(name):
    xs = batches(3)
    bad = xs[1].clone()
    bad[0, 0] = float("nan")
    a, b = small_model(), small_model()
    step_a = TrainStep(a, OBJECTIVES[name](), lr=1e-2)
    step_b = TrainStep(b, OBJECTIVES[name](), lr=1e-2)
    step_a(xs[0]), step_a(xs[2])                    # never sees the bad batch
    step_b(xs[0])
    out = step_b(bad)
    assert float(out["skipped"]) == 1.0
    out = step_b(xs[2])
    assert float(out["skipped"]) == 0.0
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k                # the bad step changed nothing
    for pa, pb in zip(step_a.optimizers.values(), step_b.optimizers.values()):
        for sa, sb in zip(pa.state.values(), pb.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("objective", ["exact", "surrogate"])
def test_compiled_step_trains_like_the_eager_one(objective):
    """The compiled step draws its probes from the default generator; with K = d orthonormal
    probes the surrogate is its expectation whatever the draw, so its trajectories agree too."""
    torch._dynamo.reset()
    make = {"exact": lambda: "exact", "surrogate": lambda: SurrogateObjective(probes=2)}[objective]
    xs, ws = batches(4), [0.0, 0.5, 1.0, 1.0]
    a, b = small_model(), small_model()
    eager = TrainStep(a, make(), lr=1e-2)
    compiled = TrainStep(b, make(), lr=1e-2, mode="compiled")
    ref = [float(eager(x, w)["loss"]) for x, w in zip(xs, ws)]
    got = [float(compiled(x, w)["loss"]) for x, w in zip(xs, ws)]
    assert compiled.compiled_forward is not None
    assert got == pytest.approx(ref, rel=1e-9)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-8, atol=1e-10, msg=k)


def test_captured_mode_off_cuda_runs_eagerly_and_says_so():
    m = small_model()
    step = TrainStep(m, "exact", mode="captured", compile=False, example_x=batches(1)[0])
    assert not step.captured and "CUDA device" in step.reason
    assert torch.isfinite(step(batches(1)[0])["loss"])


def test_update_false_leaves_gradients_and_weights():
    m = small_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = TrainStep(m, "exact", update=False)(batches(1)[0])
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resolve_mode():
    exact = make_objective("exact")
    assert resolve_mode("auto", torch.device("cpu"), exact) == "eager"
    assert resolve_mode("auto", torch.device("cuda"), exact) == "captured"
    assert resolve_mode("auto", torch.device("cuda"), exact, distributed=True) == "compiled"
    assert resolve_mode("compiled", torch.device("cpu"), exact) == "compiled"
    with pytest.raises(ValueError, match="step mode must be 'auto' or one of"):
        resolve_mode("fast", torch.device("cpu"), exact)


def test_bad_arguments_say_what_to_change():
    m = small_model()
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainStep(m, "exact", mode="auto")
    with pytest.raises(ValueError, match="unknown objective 'ml'"):
        TrainStep(m, "ml")
    with pytest.raises(ValueError, match=r"has phases \['reconstruction', 'likelihood'\]"):
        TrainStep(m, "two-step", torch.optim.Adam(m.parameters()))
    with pytest.raises(ValueError, match="update=False runs no optimiser"):
        TrainStep(m, "exact", torch.optim.Adam(m.parameters()), update=False)
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        TrainStep(m, "exact", compile="yes")
    with pytest.raises(ValueError, match="beta must be a number >= 0"):
        ExactObjective(beta=-1.0)
    with pytest.raises(ValueError, match="probes must be a positive int"):
        HutchinsonObjective(probes=0)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['samples'\]; it takes "
                       r"\['beta', 'cg_max_iter', 'cg_rtol', 'probe', 'probes'\]"):
        HutchinsonObjective(samples=2)


# ----------------------------------------------------------------------------- CUDA


def assert_same_step(step, model, ref_step, ref_model, x):
    """``step(x)`` (update=False) gives ``ref_step(x)``'s loss and gradients to float32
    rounding: loss to 1e-5, gradients to 1e-4 in norm (relative)."""
    got_loss = float(step(x)["loss"])
    got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    ref_loss = float(ref_step(x)["loss"])
    ref = [p.grad.clone() for p in ref_model.parameters() if p.grad is not None]
    assert len(got) == len(ref) > 0
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)
    num = sum(((g - r) ** 2).sum() for g, r in zip(got, ref)) ** 0.5
    den = sum((r ** 2).sum() for r in ref) ** 0.5
    assert float(num / den) < 1e-4


@needs_cuda
@pytest.mark.parametrize("name", ["exact", "two-step", "surrogate"])
def test_cuda_captured_replay_trains_like_eager_and_construction_does_not_train(name):
    """Captured without compiling: the replay runs the eager step's kernels, so the trajectory
    follows the eager one (losses and weights to 1e-4 over 4 Adam steps)."""
    xs, ws = batches(4, "cuda", torch.float32), [0.0, 0.5, 1.0, 1.0]
    a, b = small_model("cuda", torch.float32), small_model("cuda", torch.float32)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    eager = TrainStep(a, OBJECTIVES[name](), lr=1e-2)
    captured = TrainStep(b, OBJECTIVES[name](), lr=1e-2, mode="captured", compile=False,
                         example_x=xs[0])
    assert captured.captured
    for k, v in b.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref = [float(eager(x, w)["loss"]) for x, w in zip(xs, ws)]
    got = [float(captured(x, w)["loss"]) for x, w in zip(xs, ws)]
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=k)


@needs_cuda
@pytest.mark.parametrize("name", ["exact", "two-step"])
def test_cuda_compiled_capture_computes_the_eager_loss_and_gradients(name):
    """Compiled and captured, loss and backward only, replayed on fresh batches: every replay's
    loss and gradients equal the eager step's on the same batch to float32 rounding (inductor
    reorders float32 arithmetic). Adam trajectories are not compared: Adam turns rounding-level
    differences of near-zero gradient components into updates of the size of the learning rate
    (on an H200 the compiled trajectory drifted 1e-3 from the eager one in 3 steps)."""
    torch._dynamo.reset()
    xs = batches(4, "cuda", torch.float32)
    a, b = small_model("cuda", torch.float32), small_model("cuda", torch.float32)  # same weights
    eager = TrainStep(a, OBJECTIVES[name](), update=False)
    # the graph owns b's gradient tensors: nothing else may reset b's .grad
    captured = TrainStep(b, OBJECTIVES[name](), update=False, mode="captured", example_x=xs[0])
    assert captured.captured and captured.compiled_forward is not None
    for x in xs:
        assert_same_step(captured, b, eager, a, x)


@needs_cuda
def test_cuda_captured_step_skips_a_non_finite_batch():
    xs = batches(3, "cuda", torch.float32)
    bad = xs[1].clone()
    bad[0, 0] = float("nan")
    m = small_model("cuda", torch.float32)
    step = TrainStep(m, "exact", lr=1e-2, mode="captured", compile=False, example_x=xs[0])
    step(xs[0])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert float(step(bad)["skipped"]) == 1.0
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert float(step(xs[2])["skipped"]) == 0.0


@needs_cuda
def test_cuda_captured_step_outlives_another_captured_graph():
    """Two captured steps, the first destroyed (and its memory reused) before the second
    replays: the replay still computes the eager loss and gradients. torch keys cuBLAS
    workspaces by stream, and graphs that share a capture stream can free each other's
    workspace when one is destroyed (pytorch/pytorch#193402); each step captures on its own."""
    import gc

    def model():
        torch.manual_seed(0)
        m = RectangularFlow.tabular(43, 21, ambient_layers=2, ambient_hidden=(128, 128), prior_layers=1,
                            prior_hidden=(32,)).cuda()
        m.initialize(torch.randn(400, 43, device="cuda"))  # ActNorm initialisation
        return m

    x = torch.randn(400, 43, generator=torch.Generator().manual_seed(2)).cuda()
    a, b, c = model(), model(), model()
    first = TrainStep(a, "exact", update=False, mode="captured", compile=False, example_x=x)
    second = TrainStep(b, "exact", update=False, mode="captured", compile=False, example_x=x)
    first(x)
    del first, a
    gc.collect()
    torch.cuda.empty_cache()
    junk = torch.full((64 << 20,), float("nan"), device="cuda")  # noqa: F841 - reuses memory
    assert_same_step(second, b, TrainStep(c, "exact", update=False), c, x)


@needs_cuda
def test_cuda_captured_refuses_a_non_capturable_optimizer():
    m = small_model("cuda", torch.float32)
    with pytest.raises(ValueError, match="capturable=True"):
        TrainStep(m, "exact", torch.optim.Adam(m.parameters()), mode="captured",
                  example_x=batches(1, "cuda", torch.float32)[0])
    with pytest.raises(ValueError, match="needs example_x"):
        TrainStep(m, "exact", mode="captured")


def test_precision_sets_the_gemm_mode_inside_the_step_only():
    from injflow_ext.train.step import matmul_precision
    seen = []
    torch.backends.cuda.matmul.allow_tf32 = False
    with matmul_precision("tf32"):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
    with matmul_precision(None):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
    assert seen == [True, False] and torch.backends.cuda.matmul.allow_tf32 is False
    m = small_model()
    out = TrainStep(m, "exact", precision="tf32")(batches(1)[0])   # no effect on the CPU
    assert torch.isfinite(out["loss"]) and torch.backends.cuda.matmul.allow_tf32 is False
    with pytest.raises(ValueError, match="precision must be None, 'float32' or 'tf32'"):
        TrainStep(m, "exact", precision="bf16")


def test_two_step_prior_trains_during_a_zero_likelihood_warm_up():
    """The two-step prior flow is trained by the likelihood alone: its weight is floored at
    1e-12 (Adam undoes the scale), as the trainer always did, so a warm-up at 0 does not
    freeze it."""
    m = small_model()
    before = [p.clone() for p in m.prior.parameters()]
    TrainStep(m, TwoStepObjective(beta=10.0), lr=1e-2)(batches(1)[0], likelihood_weight=0.0)
    assert any(not torch.equal(a, p) for a, p in zip(before, m.prior.parameters()))
