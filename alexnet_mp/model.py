"""The 2012 network and the one-column net of "One weird trick", as plain modules that know nothing of
parallelism. Each is a chain of named layers run in order (conv1 ... conv5, fc6, fc7, fc8, with the ReLUs
and dropouts between them), so its state_dict keys are the layers' names, and a layout (strategies/)
places, shards or wraps the layers it needs and is entered through the net's forward. The paper's two
towers are architecture: conv2, conv4 and conv5 are grouped convolutions (groups=2) and the LRNs
normalise each tower's maps on their own.

Where the paper is ambiguous, the choices are explained in docs/reproduction.md.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet_mp.blocks import WHOLE, Block, rows
from alexnet_mp.rng import seeded_generator

IMAGE_SIZE = 224
DROPOUT = 0.5


@dataclass(frozen=True)
class ConvSpec:
    name: str
    out_channels: int
    kernel: int
    stride: int = 1
    # An int pads symmetrically; a (left, right, top, bottom) tuple pads the input explicitly first.
    padding: int | tuple[int, int, int, int] = 0
    # True: groups=2 in the one-device net, i.e. each tower reads only its own tower's maps.
    own_tower_only: bool = False
    lrn: bool = False
    pool: bool = False
    bias: float = 0.0


@dataclass(frozen=True)
class Architecture:
    name: str
    convs: tuple[ConvSpec, ...]
    towers: int
    fc_units: tuple[int, int] = (4096, 4096)
    fc_bias: tuple[float, float, float] = (1.0, 1.0, 0.0)  # fc6, fc7, fc8

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Its weight layers, in the order the forward pass runs them."""
        return tuple(spec.name for spec in self.convs) + FC_NAMES

    @property
    def feature_size(self) -> int:
        """Inputs of fc6: the last conv's pooled maps, flattened."""
        side = conv_output_sides(self)[-1]
        return self.convs[-1].out_channels * side * side


# conv1 padding (0, 3, 0, 3): cuda-convnet2's 1 + ceil((224 - 11) / 4) = 55 outputs, the last window
# hanging 3 pixels over the right and bottom edges into zeros (docs/reproduction.md).
PAPER = Architecture(
    name="paper",
    towers=2,
    convs=(
        ConvSpec("conv1", 96, 11, stride=4, padding=(0, 3, 0, 3), lrn=True, pool=True),
        ConvSpec("conv2", 256, 5, padding=2, own_tower_only=True, lrn=True, pool=True, bias=1.0),
        ConvSpec("conv3", 384, 3, padding=1),
        ConvSpec("conv4", 384, 3, padding=1, own_tower_only=True, bias=1.0),
        ConvSpec("conv5", 256, 3, padding=1, own_tower_only=True, pool=True, bias=1.0),
    ),
)

# The one-column net of Krizhevsky 2014, as torchvision's `alexnet` lays it out (no LRN).
OWT = Architecture(
    name="owt",
    towers=1,
    convs=(
        ConvSpec("conv1", 64, 11, stride=4, padding=2, pool=True),
        ConvSpec("conv2", 192, 5, padding=2, pool=True, bias=1.0),
        ConvSpec("conv3", 384, 3, padding=1),
        ConvSpec("conv4", 256, 3, padding=1, bias=1.0),
        ConvSpec("conv5", 256, 3, padding=1, pool=True, bias=1.0),
    ),
)

DEBUG_FC_UNITS = 256


def debug_flavor(arch: Architecture) -> Architecture:
    """`arch` with fc6 and fc7 of 256 units: the same convs and towers, a twelfth of the parameters, for quick
    checks and the tests (as torchtitan's debugmodel); every layout runs it as it runs `arch`."""
    return replace(arch, name=f"{arch.name}-debug", fc_units=(DEBUG_FC_UNITS, DEBUG_FC_UNITS))


ARCHITECTURES = {arch.name: arch for base in (PAPER, OWT) for arch in (base, debug_flavor(base))}
ARCH_HELP = ("paper: the 2012 two-tower net; owt: the one-column net of 'One weird trick'; "
             f"X-debug: X with fc6 and fc7 of {DEBUG_FC_UNITS} units, for quick checks")
FC_NAMES = ("fc6", "fc7", "fc8")

# torchvision.models.alexnet's parameter prefixes for the owt net's layers.
TORCHVISION_NAMES = {
    "features.0": "conv1", "features.3": "conv2", "features.6": "conv3", "features.8": "conv4",
    "features.10": "conv5", "classifier.1": "fc6", "classifier.4": "fc7", "classifier.6": "fc8",
}


def conv_sides(arch: Architecture, image_size: int = IMAGE_SIZE) -> list[tuple[int, int]]:
    """Spatial side of each conv's output, and of its block's output (after the pool, if any)."""
    sides, side = [], image_size
    for spec in arch.convs:
        padded = side + (sum(spec.padding[:2]) if isinstance(spec.padding, tuple) else 2 * spec.padding)
        conv = (padded - spec.kernel) // spec.stride + 1
        side = (conv - 3) // 2 + 1 if spec.pool else conv  # overlapping max-pool, 3x3 stride 2
        sides.append((conv, side))
    return sides


def conv_output_sides(arch: Architecture, image_size: int = IMAGE_SIZE) -> list[int]:
    """Spatial side of each conv block's output: the next layer's input."""
    return [block for _, block in conv_sides(arch, image_size)]


def channel_window_sum(t: Tensor, axis: int, size: int, groups: int) -> Tensor:
    """For each channel along `axis`, the sum of the `size` channels centred on it, within its group
    (zero past the group's edges). `size` shifted slices of the zero-padded tensor: pointwise work
    that torch.compile fuses into one kernel (torch's LocalResponseNorm takes the slow avg_pool3d path)."""
    channels = t.shape[axis] // groups
    grouped = t.unflatten(axis, (groups, channels))
    within, half = axis + 1, size // 2
    padded = F.pad(grouped, [0, 0] * (grouped.dim() - 1 - within) + [half, half])
    total = padded.narrow(within, 0, channels).clone()
    for i in range(1, size):
        total += padded.narrow(within, i, channels)  # in place on the fresh clone: no temporary per term
    return total.flatten(axis, within)


class _ChannelLRN(torch.autograd.Function):
    """LRN along `axis` with its backward written out. Autograd of the forward would keep the padded
    squares, their shifted sum and the scale, and run `size` slice-backwards; this keeps only the input
    and recomputes the denominator, so backward reads the input and the gradient once, as forward does.

    With d = k + alpha * S(x^2) (S the window sum) and out = x * d^-beta, and windows symmetric
    (j is in i's window iff i is in j's):  dL/dx = g * d^-beta - 2 alpha beta x * S(g * x * d^(-beta-1)).
    The sum and the scale are at least float32: in bf16, k + alpha * sum rounds alpha * sum away."""

    @staticmethod
    def widened_and_denominator(maps: Tensor, axis: int, size: int, alpha: float, k: float,
                                groups: int) -> tuple[Tensor, Tensor]:
        wide = maps.to(torch.promote_types(maps.dtype, torch.float32))
        return wide, channel_window_sum(wide * wide, axis, size, groups).mul_(alpha).add_(k)

    @staticmethod
    def forward(ctx, maps: Tensor, axis: int, size: int, alpha: float, beta: float, k: float,
                groups: int) -> Tensor:
        ctx.save_for_backward(maps)
        ctx.settings = (axis, size, alpha, beta, k, groups)
        _, denominator = _ChannelLRN.widened_and_denominator(maps, axis, size, alpha, k, groups)
        return maps * denominator.pow_(-beta).to(maps.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (maps,) = ctx.saved_tensors
        axis, size, alpha, beta, k, groups = ctx.settings
        wide, denominator = _ChannelLRN.widened_and_denominator(maps, axis, size, alpha, k, groups)
        scale = denominator.pow(-beta)
        grad = grad_out.to(wide.dtype)
        coupling = channel_window_sum(grad * wide * scale / denominator, axis, size, groups)
        grad_in = (grad * scale).sub_(coupling.mul_(wide), alpha=2 * alpha * beta)
        return grad_in.to(maps.dtype), None, None, None, None, None, None


class LRN(nn.Module):
    """Local response normalisation as the paper writes it (section 3.3):

        b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2) ** beta

    alpha multiplies the plain sum. torch.nn.LocalResponseNorm, Caffe and cuda-convnet2 multiply
    the *mean* (alpha / n), so alpha=1e-4 there is not the paper's formula. `groups` normalises
    each group of channels on its own: in the one-device net the towers' halves never mix.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                 groups: int = 1) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups
        self.kernel: Callable[..., Tensor] | None = None  # kernels.lrn, set by speed.apply_triton_lrn

    def forward(self, x: Tensor) -> Tensor:
        # The window runs along channels. channels_last maps are worked on as (b, h, w, c), a view
        # in which channels are innermost, as they are in memory: every access stays contiguous
        # (over NCHW indices a fused kernel strides through memory; docs/results/choices.md).
        nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if self.kernel is not None:  # it takes channels innermost only: NCHW maps are copied there and back
            out = self.kernel(x.movedim(1, -1).contiguous(), self.size, self.alpha, self.beta, self.k,
                              self.groups).movedim(-1, 1)
            return out if nhwc else out.contiguous()
        maps = x.movedim(1, -1) if nhwc else x
        out = _ChannelLRN.apply(maps, maps.dim() - 1 if nhwc else 1, self.size, self.alpha, self.beta, self.k,
                                self.groups)
        return out.movedim(-1, 1) if nhwc else out

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


class ConvLayer(nn.Conv2d):
    """One conv layer as the paper's figure 2 draws it: the convolution, its ReLU, then the response
    normalisation and the overlapping 3x3/2 max-pool where the layer has them (sections 3.3 and 3.4). A
    Conv2d, so that its parameters keep their names (conv1.weight, ...)."""

    def __init__(self, spec: ConvSpec, in_channels: int, groups: int, lrn_groups: int, lrn_alpha: float) -> None:
        padding = 0 if isinstance(spec.padding, tuple) else spec.padding
        super().__init__(in_channels, spec.out_channels, spec.kernel, spec.stride, padding, groups=groups)
        self.explicit_padding = spec.padding if isinstance(spec.padding, tuple) else None
        self.lrn = LRN(alpha=lrn_alpha, groups=lrn_groups) if spec.lrn else None
        self.pool = spec.pool

    def forward(self, x: Tensor) -> Tensor:
        if self.explicit_padding is not None:
            x = F.pad(x, self.explicit_padding)
        x = F.relu(super().forward(x), inplace=True)
        if self.lrn is not None:
            x = self.lrn(x)
        return F.max_pool2d(x, 3, 2) if self.pool else x


@dataclass(frozen=True)
class MaskDraw:
    """What a training step's dropout masks are drawn from: the seed and the step, the global batch's size,
    and which of its rows the layer's input holds (a block, or indices in the input's order)."""

    seed: int
    step: int
    global_batch: int
    rows: slice | Tensor


class SeededDropout(nn.Module):
    """Dropout (p = 0.5 after the ReLUs of fc6 and fc7, section 4.2) whose mask depends only on (seed, step,
    layer, global sample, unit): it is drawn for the whole global batch and the whole layer from a generator
    seeded by (seed, step, layer), and the rows and units this module's input holds are sliced out, so every
    layout drops exactly the activations the one-device net drops. A layout that shards the layer sets
    `units`; the training step sets `draw`. A training forward without a draw is refused: torch's own random
    numbers would drop different activations in every layout."""

    def __init__(self, layer: int, units: int, p: float = DROPOUT) -> None:
        super().__init__()
        self.layer, self.units_total, self.p = layer, units, p
        self.units = slice(0, units)
        self.draw: MaskDraw | None = None

    def keep(self, device: torch.device) -> Tensor:
        draw = self.draw
        generator = seeded_generator(draw.seed, draw.step, self.layer, device=device)
        noise = torch.rand(draw.global_batch, self.units_total, generator=generator, device=device)
        return noise[draw.rows, self.units] >= self.p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.draw is None:
            raise RuntimeError("SeededDropout in training mode needs its draw (seed, step, rows): set `draw` before "
                               "the forward, as Layout.draw_masks does")
        return x * self.keep(x.device).to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}, units={self.units.start}:{self.units.stop} of {self.units_total}"


class AlexNet(nn.Sequential):
    """conv1 ... conv5 (`ConvLayer`s), flatten, fc6, ReLU, dropout, fc7, ReLU, dropout, fc8, run in order.
    fc6 reads conv5's pooled maps flattened channel by channel, so a tower's maps are a contiguous block of
    fc6's inputs."""

    def __init__(self, arch: Architecture = PAPER, num_classes: int = 1000, lrn_alpha: float = 1e-4,
                 init: str = "paper") -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for spec in arch.convs:
            groups = arch.towers if spec.own_tower_only else 1
            layers[spec.name] = ConvLayer(spec, in_channels, groups, arch.towers, lrn_alpha)
            in_channels = spec.out_channels
        fc6_units, fc7_units = arch.fc_units
        layers["flatten"] = nn.Flatten()
        layers["fc6"], layers["relu6"] = nn.Linear(arch.feature_size, fc6_units), nn.ReLU(inplace=True)
        layers["dropout6"] = SeededDropout(0, fc6_units)
        layers["fc7"], layers["relu7"] = nn.Linear(fc6_units, fc7_units), nn.ReLU(inplace=True)
        layers["dropout7"] = SeededDropout(1, fc7_units)
        layers["fc8"] = nn.Linear(fc7_units, num_classes)
        super().__init__(layers)
        self.arch, self.num_classes, self.init = arch, num_classes, init
        if not self.fc8.weight.is_meta:  # a net built on meta is for its shapes alone
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """`paper`: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0 (section 5).
        `he`: weights N(0, 2 / fan_in) (He et al. 2015), biases 0; it leaves chance within tens of
        SGD steps where the paper's does not (docs/reproduction.md)."""
        biases = {spec.name: spec.bias for spec in self.arch.convs}
        biases.update(zip(FC_NAMES, self.arch.fc_bias, strict=True))
        for name, layer in self.layers().items():
            if self.init == "he":
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
            else:
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.constant_(layer.bias, biases[name])

    def layers(self) -> dict[str, nn.Conv2d | nn.Linear]:
        """The layers with weights, conv1 ... fc8, by name."""
        return {name: module for name, module in self.named_children() if isinstance(module, nn.Conv2d | nn.Linear)}

    def dropouts(self) -> dict[str, SeededDropout]:
        """Each dropout, by the name of the layer whose units it drops (fc6, fc7)."""
        return {"fc6": self.dropout6, "fc7": self.dropout7}


class AlexNet2012(AlexNet):
    """The 2012 paper's network on one device: conv2/4/5 as groups=2 convs, LRN per tower."""

    def __init__(self, num_classes: int = 1000, lrn_alpha: float = 1e-4, init: str = "paper",
                 arch: Architecture = PAPER) -> None:
        super().__init__(arch, num_classes, lrn_alpha, init)


class AlexNetOWT(AlexNet):
    """The one-column net of "One weird trick" (torchvision's AlexNet): loads torchvision's
    state_dict directly (its keys are renamed on load) and exports it with `torchvision_state_dict`."""

    def __init__(self, num_classes: int = 1000, init: str = "paper", arch: Architecture = OWT) -> None:
        super().__init__(arch, num_classes, init=init)
        self._register_load_state_dict_pre_hook(_rename_torchvision_keys)

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        ours = {v: k for k, v in TORCHVISION_NAMES.items()}
        return {f"{ours[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in self.state_dict().items()}


def _rename_torchvision_keys(state_dict: dict, prefix: str, *args: object) -> None:
    for key in list(state_dict):
        layer, _, param = key[len(prefix):].rpartition(".")
        if layer in TORCHVISION_NAMES:
            state_dict[f"{prefix}{TORCHVISION_NAMES[layer]}.{param}"] = state_dict.pop(key)


INITS = ("paper", "he")


def build_model(arch: str = "paper", num_classes: int = 1000, seed: int | None = None, init: str = "paper",
                ) -> AlexNet:
    """The whole net of an architecture. With a seed, its initial weights are that seed's, whatever the global
    random state: every layout starts from them, sliced to its parts."""
    architecture = ARCHITECTURES[arch]
    cls = AlexNet2012 if architecture.towers == PAPER.towers else AlexNetOWT
    if seed is None:
        return cls(num_classes, init=init, arch=architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(num_classes, init=init, arch=architecture)


def full_shapes(arch: str, num_classes: int) -> dict[str, torch.Size]:
    """The whole net's state_dict shapes, from a net built on meta (no memory, no init)."""
    with torch.device("meta"):
        return {key: value.shape for key, value in build_model(arch, num_classes).state_dict().items()}


def tower_block(key: str, shape: torch.Size, tower: int, towers: int = PAPER.towers) -> Block | None:
    """The block of the whole 2012 net's tensor `key` (of `shape`) that tower `tower` holds: its half of every
    layer's output channels and units, and fc8 whole on tower 0, as the paper's figure 2 draws it."""
    if key.startswith("fc8."):
        return WHOLE if tower == 0 else None
    return (rows(shape[0], tower, towers),)
