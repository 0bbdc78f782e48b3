"""tangent_conv2d and tangent_epilogue: primal and tangents against torch.func.jvp of the plain
convolution in float64 (activations, stride, padding, groups, bias), gradcheck, opcheck,
torch.compile(fullgraph=True), errors. Every test runs on each available device."""

import pytest
import torch
import torch.nn.functional as F
from reference import PLAIN_ACTIVATIONS

from injflow_ext import tangent_conv2d, tangent_conv2d_packed, tangent_epilogue_packed
from injflow_ext.ops.tangent import activation_code


def plain_jvp(x, V, weight, bias, activation, **conv):
    """(y, Ẏ) by torch.func.jvp of σ(conv2d(x) + b), one tangent at a time."""
    f = lambda xi: PLAIN_ACTIVATIONS[activation](F.conv2d(xi, weight, bias, **conv))  # noqa: E731
    outs = [torch.func.jvp(f, (x,), (V[:, k],)) for k in range(V.shape[1])]
    return outs[0][0], torch.stack([o[1] for o in outs], dim=1)


CASES = [
    dict(activation="tanh", stride=1, padding=1, groups=1, bias=True),
    dict(activation=None, stride=2, padding=0, groups=1, bias=True),
    dict(activation="silu", stride=1, padding=0, groups=2, bias=False),
    dict(activation="elu", stride=2, padding=1, groups=1, bias=True),
    dict(activation="softplus", stride=1, padding=2, groups=1, bias=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['activation']}-s{c['stride']}-"
                                                      f"p{c['padding']}-g{c['groups']}")
def test_matches_torch_func_jvp(device, case):
    kw = dict(dtype=torch.float64, device=device)
    x, V = torch.randn(3, 4, 7, 6, **kw), torch.randn(3, 3, 4, 7, 6, **kw)
    weight = torch.randn(6, 4 // case["groups"], 3, 3, **kw) * 0.3
    bias = torch.randn(6, **kw) if case["bias"] else None
    conv = dict(stride=case["stride"], padding=case["padding"], groups=case["groups"])
    y, Y = tangent_conv2d(x, V, weight, bias, case["activation"], **conv)
    y_ref, Y_ref = plain_jvp(x, V, weight, bias, case["activation"], **conv)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y, Y_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    XV = torch.randn(2, 3, 2, 5, 4, **kw)
    weight, bias = torch.randn(3, 2, 3, 3, **kw), torch.randn(3, **kw)
    for act in ("tanh", "silu"):
        assert torch.autograd.gradcheck(
            lambda XV, w, b, act=act: tangent_conv2d_packed(XV, w, b, act, stride=1, padding=1),
            (XV, weight, bias))
    Z, b = torch.randn(3, 4, 5, **kw), torch.randn(5, **kw)
    assert torch.autograd.gradcheck(lambda Z, b: tangent_epilogue_packed(Z, b, "elu"), (Z, b))


def test_float32_matches_float64(device):
    x, V = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 2, 3, 8, 8,
                                                                   dtype=torch.float64)
    w, b = torch.randn(5, 3, 3, 3, dtype=torch.float64) * 0.3, torch.randn(5, dtype=torch.float64)
    ref = tangent_conv2d(x.to(device), V.to(device), w.to(device), b.to(device), "tanh",
                         padding=1)
    got = tangent_conv2d(*(t.to(device, torch.float32) for t in (x, V, w, b)), "tanh", padding=1)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    kw = dict(dtype=dtype, device=device)
    Z, b = torch.randn(3, 3, 6, **kw, requires_grad=True), torch.randn(6, **kw,
                                                                        requires_grad=True)
    for act in ("tanh", "relu", None):
        code, param = activation_code(act)
        torch.library.opcheck(torch.ops.injflow.tangent_epilogue.default, (Z, b, code, param))
        torch.library.opcheck(torch.ops.injflow.tangent_epilogue.default, (Z, None, code, param))
        with torch.no_grad():
            Y, Zb, dA = torch.ops.injflow.tangent_epilogue.default(Z, b, code, param)
        torch.library.opcheck(torch.ops.injflow.tangent_epilogue_backward.default,
                              (torch.randn_like(Y), Zb, Y, dA, code, param))


def test_the_input_is_not_modified(device):
    Z = torch.randn(2, 3, 4, device=device)
    before = Z.clone()
    tangent_epilogue_packed(Z, torch.ones(4, device=device), "tanh")
    assert torch.equal(Z, before)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    kw = dict(dtype=torch.float64, device=device)
    w = torch.randn(4, 3, 3, 3, **kw, requires_grad=True)
    b = torch.randn(4, **kw, requires_grad=True)
    XV = torch.randn(2, 3, 3, 6, 6, **kw)

    def loss(XV, w, b):
        return tangent_conv2d_packed(XV, w, b, "tanh", padding=1).square().sum()

    eager = loss(XV, w, b)
    g_eager = torch.autograd.grad(eager, (w, b))
    compiled = torch.compile(loss, fullgraph=True)(XV, w, b)
    g_compiled = torch.autograd.grad(compiled, (w, b))
    torch.testing.assert_close(compiled, eager)
    for a, r in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, r)


def test_errors():
    x, V = torch.randn(2, 3, 5, 5), torch.randn(2, 1, 3, 5, 5)
    with pytest.raises(ValueError, match=r"XV must have 5 dimensions"):
        tangent_conv2d_packed(x, torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"weight must be \(C', C / groups, kH, kW\) with C = 3"):
        tangent_conv2d(x, V, torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"bias must have shape \(4\), got \(5,\)"):
        tangent_conv2d(x, V, torch.randn(4, 3, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match=r"V must have shape \(2, \*, 3, 5, 5\)"):
        tangent_conv2d(x, torch.randn(2, 1, 3, 4, 5), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        tangent_conv2d(x, V, torch.randn(4, 3, 3, 3), activation="gelu")
    with pytest.raises(ValueError, match=r"b must have shape \(4\), got \(3,\)"):
        tangent_epilogue_packed(torch.randn(2, 2, 4), torch.randn(3))
