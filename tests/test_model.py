"""The 2012 network as the paper describes it, its towers, and the one-weird-trick column."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from alexnet_mp import LRN, AlexNet2012, AlexNetOWT
from alexnet_mp.cost import layer_costs
from alexnet_mp.model import PAPER, MaskDraw, SeededDropout


@pytest.fixture(scope="module")
def net() -> AlexNet2012:
    torch.manual_seed(0)
    return AlexNet2012()


def test_paper_net_has_60965224_parameters(net):
    assert sum(p.numel() for p in net.parameters()) == 60_965_224


def test_parameters_are_registered_in_layer_order_weight_before_bias(net):
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    expected = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    assert [name for name, _ in net.named_parameters()] == expected


def test_every_layer_has_the_papers_output_shape(net):
    """The convolutions' outputs (conv1: 96 maps of 55x55, ...), and what each layer hands on after its pool."""
    expected = {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
                "conv5": (256, 13, 13), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}
    pooled = {**expected, "conv1": (96, 27, 27), "conv2": (256, 13, 13), "conv5": (256, 6, 6)}
    seen = {}
    hooks = [getattr(net, name).register_forward_hook(
        lambda module, args, out, name=name: seen.__setitem__(name, tuple(out.shape[1:]))) for name in expected]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    for hook in hooks:
        hook.remove()
    assert seen == pooled
    assert {c.name: c.output_shape for c in layer_costs(PAPER)} == expected
    assert {c.name: c.block_shape for c in layer_costs(PAPER)} == pooled


def test_conv2_conv4_conv5_read_their_own_tower_only(net):
    assert [getattr(net, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]


def test_lrn_is_the_papers_formula():
    torch.manual_seed(0)
    a = torch.randn(2, 7, 3, 3)
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = torch.empty_like(a)
    for i in range(7):
        window = a[:, max(0, i - n // 2):min(6, i + n // 2) + 1]
        expected[:, i] = a[:, i] / (k + alpha * (window ** 2).sum(1)) ** beta
    torch.testing.assert_close(LRN()(a), expected, rtol=1e-6, atol=1e-7)


def test_lrn_differs_from_torchs_which_divides_alpha_by_n():
    a = 10 * torch.randn(1, 8, 4, 4)
    assert not torch.allclose(LRN()(a), nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a))
    torch.testing.assert_close(LRN(alpha=1e-4 / 5)(a), nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("groups", [1, 2])
def test_lrns_hand_written_backward_is_the_gradient_of_its_forward(groups, memory_format):
    torch.manual_seed(0)
    # large maps and alpha, so the window's cross-channel term is a large part of the gradient
    a = (30 * torch.randn(2, 8, 3, 3, dtype=torch.float64)).to(memory_format=memory_format).requires_grad_()
    assert torch.autograd.gradcheck(LRN(alpha=1e-2, groups=groups), (a,))


def test_lrns_gradient_equals_torchs_with_alpha_divided_by_n():
    a = (10 * torch.randn(2, 8, 4, 4)).requires_grad_()
    ours = torch.autograd.grad(LRN(alpha=1e-4 / 5)(a).square().sum(), a)[0]
    theirs = torch.autograd.grad(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a).square().sum(), a)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lrn_keeps_only_its_input_for_backward():
    a = torch.randn(2, 8, 4, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LRN()(a * 1.0)
    assert [t.shape for t in saved] == [a.shape]


def test_lrn_in_the_one_device_net_normalises_each_tower_on_its_own():
    a = torch.randn(1, 8, 2, 2)
    both = LRN(groups=2)(a)
    torch.testing.assert_close(both, torch.cat([LRN()(a[:, :4]), LRN()(a[:, 4:])], 1))


def test_init_is_the_papers(net):
    for name, layer in net.layers().items():
        assert abs(layer.weight.std().item() - 0.01) < 0.001, name
        assert abs(layer.weight.mean().item()) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name


def test_the_net_is_its_chain_of_named_layers_run_in_order(net):
    """A plain module: what a layout wraps or shards, entered through its forward."""
    assert [name for name, _ in net.named_children()] == [
        "conv1", "conv2", "conv3", "conv4", "conv5", "flatten", "fc6", "relu6", "dropout6", "fc7", "relu7", "dropout7",
        "fc8"]
    x = torch.randn(2, 3, 224, 224)
    net.eval()
    with torch.no_grad():
        chained = x
        for layer in net.children():
            chained = layer(chained)
        torch.testing.assert_close(net(x), chained)


def test_seeded_dropout_drops_a_samples_units_alike_whatever_rows_and_units_its_input_holds():
    """So a layout holding rows 2-3 of the global batch and units 4-7 drops what the one-device net drops there."""
    whole, part = SeededDropout(0, 8), SeededDropout(0, 8)
    whole.draw = MaskDraw(seed=0, step=3, global_batch=4, rows=slice(0, 4))
    part.draw, part.units = MaskDraw(seed=0, step=3, global_batch=4, rows=slice(2, 4)), slice(4, 8)
    x = torch.ones(4, 8)
    torch.testing.assert_close(part(x[2:, 4:]), whole(x)[2:, 4:])
    assert 0 < int((whole(x) == 0).sum()) < 32


def test_seeded_dropout_refuses_a_training_forward_without_a_draw():
    with pytest.raises(RuntimeError, match="needs its draw"):
        SeededDropout(0, 1000)(torch.ones(4, 1000))


def test_seeded_dropout_without_a_draw_passes_its_input_in_evaluation():
    assert torch.equal(SeededDropout(0, 1000).eval()(torch.ones(4, 1000)), torch.ones(4, 1000))


def test_owt_loads_a_torchvision_alexnet_and_computes_the_same():
    reference = torchvision.models.alexnet(num_classes=10).eval()
    owt = AlexNetOWT(num_classes=10).eval()
    owt.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(owt(x), reference(x))
    assert reference.load_state_dict(owt.torchvision_state_dict()) is not None
