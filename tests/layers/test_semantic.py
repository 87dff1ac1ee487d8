"""Semantic feature network: shapes, targets and loss, bad input, the channels-last weights, its instance norm and
the MONAI network it stands for."""

import copy

import pytest
import torch

from layers.features import signed_distance_maps
from layers.semantic import InstanceNorm, SemanticNet, instance_norm, semantic_loss, semantic_targets


@pytest.mark.parametrize("n,shape", [(2, (32, 48)), (3, (16, 32, 16))])
def test_semantic_net_maps_an_image_to_one_channel_per_label(n, shape):
    net = SemanticNet(n, 3)
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 3, *shape)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_semantic_net_is_small():
    assert sum(p.numel() for p in SemanticNet(3, 2).parameters()) < 400_000


def test_semantic_net_refuses_bad_input():
    net = SemanticNet(3, 2)
    with pytest.raises(ValueError, match="multiple of 16"):
        net(torch.zeros(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="single-channel"):
        net(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="3D"):
        net(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="labels"):
        SemanticNet(3, 0)
    with pytest.raises(ValueError, match="six"):
        SemanticNet(3, 2, features=(8, 16))


def test_targets_are_the_unit_scale_signed_distance_maps():
    lab = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    lab[0, 0, 4:9, 5:12] = 1
    lab[0, 0, 10:14, 2:6] = 2
    t = semantic_targets(lab, [1, 2], (1.0, 2.0))
    torch.testing.assert_close(t, signed_distance_maps(lab, [1, 2], (1.0, 2.0), 1.0))
    assert (t[0, 0][lab[0, 0] == 1] < 0).all() and (t[0, 0][lab[0, 0] != 1] > 0).all()


def test_semantic_loss_is_the_squared_error_plus_one_minus_soft_dice():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    b = torch.randn(2, 2, 8, 8, generator=g, dtype=torch.float64)
    b[1, 1] = b[1, 1].abs() + 0.1  # label absent from this target: left out of the Dice
    soft, inside = torch.sigmoid(-4 * a), (b < 0).double()
    ref_dice = []
    for i in range(2):
        for k in range(2):
            if inside[i, k].sum() > 0:
                ref_dice.append(2 * (soft[i, k] * inside[i, k]).sum() / (soft[i, k].sum() + inside[i, k].sum()))
    ref = ((a - b) ** 2).mean() + (1 - torch.stack(ref_dice)).mean()
    torch.testing.assert_close(semantic_loss(a, b), ref)
    far = torch.where(b < 0, -50.0, 50.0).double()  # a perfect, very sharp prediction: only the squared error is left
    torch.testing.assert_close(semantic_loss(far, b), ((far - b) ** 2).mean() + 0.0, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="differ"):
        semantic_loss(a, b[:, :1])


def test_channels_last_weights_give_the_maps_and_gradients_of_contiguous_ones():
    """The 3D network keeps its convolution weights channels-last; the same network with contiguous weights
    gives the same maps and gradients (input and weights) to float64 rounding (measured ~1e-16 relative)."""
    torch.manual_seed(0)
    net = SemanticNet(3, 2, (4, 4, 6, 6, 8, 4)).double()
    assert net.net.conv_0.conv_0.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert ref.net.conv_0.conv_0.conv.weight.is_contiguous()
    image = torch.randn(2, 1, 16, 32, 16, dtype=torch.float64, requires_grad=True)
    outs, grads = [], []
    for model in (net, ref):
        out = model(image)
        weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        outs.append(out)
        grads.append(torch.autograd.grad((weight * out).sum(), [image, *model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12 * float(outs[1].detach().abs().max()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_instance_norm_equals_torch_instance_norm_and_keeps_the_layout(layout):
    """Values and gradients (input, weight, bias) against ``torch.nn.functional.instance_norm`` in float64, on a
    channel with a large mean (where one-pass variance formulas lose digits)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 6, 7, generator=g, dtype=torch.float64)
    x[:, 1] += 1e4
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    weight = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    out = instance_norm(x, weight, bias, 1e-5)
    ref = torch.nn.functional.instance_norm(x, weight=weight, bias=bias, eps=1e-5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) == (layout == "channels_last")
    probe = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((probe * out).sum(), [x, weight, bias]),
                    torch.autograd.grad((probe * ref).sum(), [x, weight, bias])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="affine"):
        InstanceNorm(torch.nn.InstanceNorm3d(3))


@pytest.mark.parametrize("n,shape", [(2, (32, 48)), (3, (16, 32, 16))])
def test_semantic_net_equals_the_monai_basic_unet_it_stands_for(n, shape):
    """SemanticNet (its own instance norms, no decoder padding, channels-last weights) against a MONAI
    BasicUNet built with the same arguments and loaded with the same state dict: maps and gradients in float64."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(2)
    widths = (4, 4, 6, 6, 8, 4)
    net = SemanticNet(n, 2, widths).double()
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)) for m in net.modules())
    ref = BasicUNet(spatial_dims=n, in_channels=1, out_channels=2, features=widths,
                    act=("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
                    norm=("instance", {"affine": True})).double()
    with torch.no_grad():  # non-trivial norm parameters
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.load_state_dict(net.net.state_dict())
    image = torch.randn(2, 1, *shape, dtype=torch.float64, requires_grad=True)
    out, expected = net(image), ref(image)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10 * float(expected.detach().abs().max()))
    probe = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    for a, b in zip(torch.autograd.grad((probe * out).sum(), [image, *net.net.parameters()]),
                    torch.autograd.grad((probe * expected).sum(), [image, *ref.parameters()])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * max(1.0, float(b.abs().max())))


def test_bf16_precision_runs_the_convolutions_in_bfloat16_and_returns_the_input_dtype():
    torch.manual_seed(0)
    net = SemanticNet(3, 2, (4, 4, 6, 6, 8, 4))
    image = torch.randn(2, 1, 16, 16, 32)
    ref = net(image)
    seen = []
    net.net.conv_0.conv_0.conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    net.precision = "bf16"
    out = net(image)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: the maps agree to a few per cent of their range, not to float32 rounding
    assert 0 < float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    with pytest.raises(ValueError, match="precision"):
        net.precision = "16"


def test_instance_norm_of_bfloat16_activations_computes_in_float32():
    """bfloat16 activations with a large mean (conv outputs under autocast): statistics and normalisation in
    float32, only the result rounded to bfloat16, so the error is that last rounding (half an ulp of values of
    magnitude < 4: 2^-8 · 4 / 2 < 0.008), not the cancellation of bfloat16 statistics."""
    g = torch.Generator().manual_seed(4)
    x = (50 + 3 * torch.randn(1, 2, 8, 8, 8, generator=g)).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    weight, bias = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.2])
    out = instance_norm(x, weight, bias)
    ref = torch.nn.functional.instance_norm(x.double(), weight=weight.double(), bias=bias.double(), eps=1e-5)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last_3d)
    assert float(ref.abs().max()) < 4
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.008)
