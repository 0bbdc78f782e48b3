"""Image bijections with batched tangents (injflow_ext.nn.image), float64: the inverse, log|det|
against the autograd Jacobian, packed tangents against J·V, squeeze against pixel_unshuffle,
ActNorm's per-channel initialisation, errors."""

import pytest
import torch
import torch.nn.functional as F
from reference import batched_jacobian

from injflow_ext import make_objective
from injflow_ext.nn import (
    ChannelActNorm,
    ConvAffineCoupling,
    InvertibleConv1x1,
    LogitPixels,
    Sequential,
    Squeeze,
    Unsqueeze,
)

SHAPE = (2, 4, 4)


def perturbed(layer, scale=0.2, seed=0):
    torch.manual_seed(seed)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer.eval()


LAYERS = {
    "squeeze": lambda: Squeeze(SHAPE),
    "unsqueeze": lambda: Unsqueeze(SHAPE),
    "logit": lambda: LogitPixels(32, 0.05),
    "actnorm": lambda: ChannelActNorm(SHAPE),
    "conv1x1": lambda: InvertibleConv1x1(SHAPE, seed=3),
    "coupling-checkerboard": lambda: ConvAffineCoupling(SHAPE, "checkerboard", hidden=(6,),
                                                        activation="tanh"),
    "coupling-checkerboard-odd": lambda: ConvAffineCoupling(SHAPE, "checkerboard-odd",
                                                            hidden=(6, 6), activation="silu"),
    "coupling-channel": lambda: ConvAffineCoupling(SHAPE, "channel", hidden=(6,)),
    "coupling-channel-exp": lambda: ConvAffineCoupling(SHAPE, "channel-second", hidden=(6,),
                                                       scale="exp"),
    "sequential": lambda: Sequential(ChannelActNorm(SHAPE), ConvAffineCoupling(SHAPE, hidden=(6,)),
                                     InvertibleConv1x1(SHAPE), Squeeze(SHAPE),
                                     ConvAffineCoupling((8, 2, 2), "channel", hidden=(6,))),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_inverse_logdet_and_tangents(name):
    layer = perturbed(LAYERS[name]())
    x = torch.randn(3, 32, dtype=torch.float64)
    y, lad = layer(x)
    x_back, ilad = layer.inverse_with_logabsdet(y)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ilad, -lad, rtol=1e-10, atol=1e-10)
    J = batched_jacobian(lambda z: layer(z)[0], x)                    # (B, n, n)
    torch.testing.assert_close(lad, torch.linalg.slogdet(J)[1], rtol=1e-10, atol=1e-10)
    V = torch.randn(3, 4, 32, dtype=torch.float64)
    y2, Y = layer.jvp(x, V)
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(Y, (J @ V.mT).mT, rtol=1e-10, atol=1e-10)


def test_squeeze_is_pixel_unshuffle():
    x = torch.randn(5, 2, 4, 6)
    y, lad = Squeeze((2, 4, 6))(x.reshape(5, -1))
    torch.testing.assert_close(y, F.pixel_unshuffle(x, 2).reshape(5, -1))
    assert Squeeze((2, 4, 6)).out_shape == (8, 2, 3) and not lad.any()


def test_unsqueeze_is_pixel_shuffle():
    x = torch.randn(5, 8, 2, 3)
    y, lad = Unsqueeze((2, 4, 6))(x.reshape(5, -1))
    torch.testing.assert_close(y, F.pixel_shuffle(x, 2).reshape(5, -1))
    assert Unsqueeze((2, 4, 6)).shape == (8, 2, 3) and not lad.any()


def test_image_flow_ends_on_the_pixel_grid_and_mixes_the_latent():
    """Towards the data the last blocks act on the image itself (its own H × W grid), and
    at initialisation every latent direction moves every pixel (the dense latent-end map);
    without it a latent coordinate moves only one pixel of each channel group."""
    from injflow_ext.nn import image_flow
    flow = image_flow((1, 8, 8), levels=2, couplings=2, hidden=(4,))
    # data end, as Glow from the data: ActNorm, 1×1 convolution, coupling on the 8 × 8 grid
    assert [type(m).__name__ for m in flow.layers[-3:]] == ["ConvAffineCoupling",
                                                            "InvertibleConv1x1", "ChannelActNorm"]
    assert all(m.shape == (1, 8, 8) for m in flow.layers[-3:])
    assert type(flow.layers[0]).__name__ == "InvertibleLinear"
    for mixing, spread in ((True, 64), (False, 4)):
        flow = image_flow((1, 8, 8), levels=2, couplings=2, hidden=(4,), latent_mixing=mixing)
        V = torch.eye(64)[:3].unsqueeze(0)                        # three latent directions
        _, Y = flow.eval().jvp(torch.zeros(1, 64), V)
        assert ((Y[0].abs() > 1e-7).sum(-1) == spread).all(), (mixing, (Y[0].abs() > 1e-7).sum(-1))


def test_channel_actnorm_initialises_per_channel():
    layer = ChannelActNorm((3, 4, 4)).train()
    x = torch.randn(64, 3, 4, 4) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2.0
    y, _ = layer(x.reshape(64, -1))
    per_channel = y.reshape(64, 3, 16)
    torch.testing.assert_close(per_channel.mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std((0, 2)), torch.ones(3), atol=1e-4, rtol=0)


def test_the_coupling_starts_as_the_identity_and_gradients_reach_the_cnn():
    layer = ConvAffineCoupling(SHAPE, hidden=(6,)).double()
    x = torch.randn(3, 32, dtype=torch.float64)
    y, lad = layer(x)
    torch.testing.assert_close(y, x)
    assert not lad.any()
    (layer.jvp(x, torch.randn(3, 2, 32, dtype=torch.float64))[1].square().sum() + y.sum()
     ).backward()
    assert layer.conditioner.weights[-1].grad.abs().sum() > 0


def test_image_flow_as_the_ambient_flow_of_a_rectangular_flow():
    """A multiscale image flow as h of a RectangularFlow (flat layout, d = 3 of 2·4·4): the
    library's exact log-density equals prior_log_prob − ½ log det JᵀJ with J from autograd, the
    fast tangent path gives J, and the surrogate and Hutchinson objectives run unchanged."""
    from injflow_ext import RectangularFlow
    from injflow_ext.estimators import decoder_jacobian
    from injflow_ext.nn import image_flow

    torch.manual_seed(0)
    m = RectangularFlow.tabular(32, 3, ambient_layers=0, prior_layers=1, prior_hidden=(4,)).double()
    m.ambient = image_flow(SHAPE, levels=2, couplings=2, hidden=(6,)).double()
    # forward (latent to data) ends at the image; the latent end is the coarsest scale
    assert m.ambient.out_shape == SHAPE and m.ambient.shape == (8, 2, 2)
    x = torch.randn(16, 32, dtype=torch.float64)
    m.train()
    m.initialize(x)                                                          # ActNorm initialisation
    m = perturbed(m, 0.05)
    u = m.encode(x)
    J = batched_jacobian(m.decode, u)
    _, J_fast = decoder_jacobian(m.decoder, u)
    torch.testing.assert_close(J_fast, J, rtol=1e-10, atol=1e-10)
    ref = m.prior_log_prob(u) - 0.5 * torch.logdet(J.mT @ J)
    torch.testing.assert_close(m.log_prob(x), ref, rtol=1e-10, atol=1e-10)
    for method in ("exact", "hutchinson", "surrogate"):
        out = make_objective(method).loss(m, x)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()


def test_rectangular_flow_images(tmp_path):
    """RectangularFlow.images: encode takes (B, C, H, W) or flat, decode / project / sample
    return images, log_prob is the autograd reference, every objective trains on image
    batches, and save/load rebuilds the image model."""
    from injflow_ext import RectangularFlow

    torch.manual_seed(0)
    m = RectangularFlow.images(SHAPE, 3, levels=2, couplings=2, hidden=(6,),
                                   prior_layers=1, prior_hidden=(4,)).double()
    x = torch.randn(8, *SHAPE, dtype=torch.float64)
    m.train()
    m.initialize(x)                                                          # ActNorm initialisation
    m = perturbed(m, 0.05)
    u = m.encode(x)
    assert u.shape == (8, 3)
    torch.testing.assert_close(m.encode(x.reshape(8, -1)), u)
    assert m.decode(u).shape == (8, *SHAPE) and m.project(x).shape == (8, *SHAPE)
    assert m.sample(5, torch.Generator().manual_seed(0)).shape == (5, *SHAPE)
    J = batched_jacobian(lambda v: m.decode(v).reshape(len(v), -1), u)
    ref = m.prior_log_prob(u) - 0.5 * torch.logdet(J.mT @ J)
    torch.testing.assert_close(m.log_prob(x), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.log_prob(x.reshape(8, -1)), ref, rtol=1e-10, atol=1e-10)
    for method in ("exact", "hutchinson", "surrogate"):
        out = make_objective(method).loss(m, x)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
    for phase in ("reconstruction", "likelihood"):
        make_objective("two-step").loss(m, x, phase)["loss"].backward()
    m.save(str(tmp_path / "m.pt"))
    back = RectangularFlow.load(str(tmp_path / "m.pt")).eval()
    assert back.image_shape == SHAPE
    torch.testing.assert_close(back.log_prob(x), m.log_prob(x), rtol=0, atol=0)  # float64 kept
    with pytest.raises(ValueError, match=r"x must be \(B, 2, 4, 4\) or flat \(B, 32\)"):
        m.encode(torch.randn(2, 2, 4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"must agree, got ambient.n=32, prod\(data_shape\)=30"):
        RectangularFlow(m.ambient, 3, data_shape=(2, 3, 5))


def test_logit_pixels_maps_onto_the_pixel_range_and_a_model_keeps_pixel_units():
    layer = LogitPixels(4, 0.05)
    x, _ = layer(torch.tensor([[-50.0, 0.0, 3.0, 50.0]], dtype=torch.float64))
    torch.testing.assert_close(x, torch.tensor([[-0.05 / 0.9, 0.5, (torch.sigmoid(
        torch.tensor(3.0, dtype=torch.float64)).item() - 0.05) / 0.9, 0.95 / 0.9]],
        dtype=torch.float64))
    from injflow_ext import RectangularFlow
    torch.manual_seed(0)
    m = perturbed(RectangularFlow.tabular(5, 2, ambient_layers=2, ambient_hidden=(8,), prior_layers=1,
                                  prior_hidden=(4,), actnorm=False, logit_alpha=0.05), 0.1)
    x = torch.rand(6, 5, dtype=torch.float64) * 0.8 + 0.1
    u = m.encode(x)
    J = batched_jacobian(m.decode, u)
    torch.testing.assert_close(m.log_prob(x), m.prior_log_prob(u) - 0.5 * torch.logdet(J.mT @ J))
    assert ((m.sample(50) > -0.06) & (m.sample(50) < 1.06)).all()
    with pytest.raises(ValueError, match="alpha must be in"):
        LogitPixels(3, 0.5)


def test_errors():
    with pytest.raises(ValueError, match="H and W must be even"):
        Squeeze((1, 3, 4))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        ChannelActNorm((4, 4))
    with pytest.raises(ValueError, match="mask must be one of"):
        ConvAffineCoupling(SHAPE, "stripes")
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ConvAffineCoupling(SHAPE, torch.ones(32, dtype=torch.bool))
    with pytest.raises(ValueError, match="must have 32 features"):
        ConvAffineCoupling(SHAPE)(torch.randn(2, 31))
