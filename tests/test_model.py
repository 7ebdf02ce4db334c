"""The 2012 network as the paper describes it, its towers, and the one-weird-trick column."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from alexnet_mp import LRN, AlexNet2012, AlexNetOWT, Tower
from alexnet_mp.cost import layer_costs
from alexnet_mp.model import PAPER, full_to_towers, parameter_count, towers_to_full


@pytest.fixture(scope="module")
def net() -> AlexNet2012:
    torch.manual_seed(0)
    return AlexNet2012()


def test_paper_net_has_60965224_parameters(net):
    assert parameter_count(net) == 60_965_224


def test_parameters_are_registered_in_layer_order_weight_before_bias(net):
    layers = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
    expected = [f"{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    assert [name for name, _ in net.named_parameters()] == expected


def test_every_layer_has_the_papers_output_shape(net):
    expected = {"conv1": (96, 55, 55), "conv2": (256, 27, 27), "conv3": (384, 13, 13), "conv4": (384, 13, 13),
                "conv5": (256, 13, 13), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,)}
    seen = {}
    hooks = [getattr(net, name).register_forward_hook(
        lambda module, args, out, name=name: seen.__setitem__(name, tuple(out.shape[1:]))) for name in expected]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    for hook in hooks:
        hook.remove()
    assert seen == expected
    assert {c.name: c.output_shape for c in layer_costs(PAPER)} == expected


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


def test_towers_hold_half_of_every_conv_and_fc8_lives_on_tower_0():
    tower0, tower1 = Tower(0), Tower(1)
    assert [getattr(tower0, f"conv{i}").out_channels for i in range(1, 6)] == [48, 128, 192, 192, 128]
    assert tower0.conv3.in_channels == 256 and tower0.conv4.in_channels == 192  # conv3 reads both towers
    assert (tower0.fc6.out_features, tower0.fc7.in_features, tower0.fc7.out_features) == (2048, 4096, 2048)
    assert tower0.fc8.in_features == 4096 and tower1.fc8 is None


def test_tower_state_dicts_round_trip_through_the_one_device_net(net):
    tower0, tower1 = full_to_towers(net.state_dict())
    Tower(0).load_state_dict(tower0)
    Tower(1).load_state_dict(tower1)
    full = towers_to_full(tower0, tower1)
    assert list(full) == list(net.state_dict())
    assert all(torch.equal(full[key], value) for key, value in net.state_dict().items())


def test_a_tower_has_no_forward_of_its_own():
    with pytest.raises(RuntimeError, match="strategy"):
        Tower(0)(torch.randn(1, 3, 224, 224))


def test_owt_loads_a_torchvision_alexnet_and_computes_the_same():
    reference = torchvision.models.alexnet(num_classes=10).eval()
    owt = AlexNetOWT(num_classes=10).eval()
    owt.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(owt(x), reference(x))
    assert reference.load_state_dict(owt.torchvision_state_dict()) is not None
