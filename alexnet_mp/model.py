"""The 2012 network (and the one-weird-trick column), written once.

One class, `AlexNet`, builds any piece of the network a layout needs: the whole net on one device
(`AlexNet2012`, the reference), one tower of the paper's two (`Tower`), or a full conv column with a
1/N shard of the fully connected layers (the one-weird-trick layout). Every parameter of a piece is a
contiguous block of rows (dim 0) of the same parameter of the whole net, which makes the state_dict
conversions exact slicing and concatenation.

Where the paper is ambiguous, the choices are explained in docs/reproduction.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

ARCHITECTURES = {arch.name: arch for arch in (PAPER, OWT)}
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
        # (over NCHW indices a fused kernel strides through memory, measured 10x slower on a GPU).
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


def part_size(total: int, count: int) -> int:
    if total % count:
        raise ValueError(f"{total} does not split into {count} equal parts")
    return total // count


def rows(total: int, index: int, count: int) -> slice:
    """The contiguous block of `total` rows (channels, units, samples) that part `index` of `count` holds."""
    size = part_size(total, count)
    return slice(index * size, (index + 1) * size)


class DropoutMasks:
    """Dropout masks that depend only on (seed, step, layer, global sample, unit).

    The mask for a layer is drawn over the whole global batch and the whole layer from a generator
    seeded by (seed, step, layer); each layout slices out the samples and units it holds, so every
    layout drops exactly the same activations as the one-device net.
    """

    def __init__(self, seed: int, step: int, global_batch: int, samples: slice | None = None,
                 p: float = DROPOUT) -> None:
        self.seed, self.step, self.global_batch, self.p = seed, step, global_batch, p
        self.samples = samples if samples is not None else slice(0, global_batch)

    def keep(self, layer: int, units_total: int, units: slice, device: torch.device) -> Tensor:
        generator = seeded_generator(self.seed, self.step, layer, device=device)
        noise = torch.rand(self.global_batch, units_total, generator=generator, device=device)
        return noise[self.samples, units] >= self.p

    def apply(self, x: Tensor, layer: int, units_total: int, units: slice) -> Tensor:
        keep = self.keep(layer, units_total, units, x.device)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))


@dataclass(frozen=True)
class Piece:
    """Which part of the whole net a module holds (see `AlexNet`)."""

    tower: int | None = None
    fc_shard: tuple[int, int] = (0, 1)

    def block(self, key: str, arch: Architecture, full_rows: int) -> slice | None:
        """The rows of the whole net's parameter `key` this piece holds; None if it holds none."""
        layer = key.split(".")[0]
        if layer == "fc8":
            return slice(0, full_rows) if self.fc_shard[0] == 0 else None
        if layer in ("fc6", "fc7"):
            return rows(full_rows, *self.fc_shard)
        return slice(0, full_rows) if self.tower is None else rows(full_rows, self.tower, arch.towers)


class AlexNet(nn.Module):
    """A piece of the network (see `Piece`): all of it, one tower, or a full conv column with a
    1/N shard of fc6 and fc7. fc8 lives whole on FC shard 0, as in the paper's figure and
    cuda-convnet2's multi-GPU configs."""

    def __init__(self, arch: Architecture = PAPER, num_classes: int = 1000, piece: Piece | None = None,
                 lrn_alpha: float = 1e-4, init: str = "paper") -> None:
        super().__init__()
        self.arch, self.num_classes, self.piece, self.init = arch, num_classes, piece or Piece(), init
        tower = self.piece.tower
        split = arch.towers if tower is not None else 1  # a tower holds 1/towers of every conv's maps
        in_channels = 3
        for spec in arch.convs:
            if tower is None:  # the towers as groups of one conv
                conv_in, groups = in_channels, arch.towers if spec.own_tower_only else 1
            else:  # a tower reads its own maps, or both towers' maps gathered by a link
                conv_in, groups = in_channels // (split if spec.own_tower_only else 1), 1
            padding = 0 if isinstance(spec.padding, tuple) else spec.padding
            self.add_module(spec.name, nn.Conv2d(conv_in, spec.out_channels // split, spec.kernel,
                                                 spec.stride, padding, groups=groups))
            in_channels = spec.out_channels
        self.lrn = LRN(alpha=lrn_alpha, groups=arch.towers if tower is None else 1)
        shard, shards = self.piece.fc_shard
        fc6_units, fc7_units = arch.fc_units
        self.fc6 = nn.Linear(arch.feature_size, part_size(fc6_units, shards))
        self.fc7 = nn.Linear(fc6_units, part_size(fc7_units, shards))
        self.fc8 = nn.Linear(fc7_units, num_classes) if shard == 0 else None
        if not self.fc6.weight.is_meta:  # a piece built on meta gets its weights from a state_dict
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
        names = [spec.name for spec in self.arch.convs] + list(FC_NAMES)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    # -- the conv column, in stages between the points where the towers exchange maps --

    def conv_stages(self) -> list[list[int]]:
        """Indices of the conv layers between links: a new stage starts at every conv that reads
        both towers' maps (conv3 in the paper net). The one-device net runs them back to back."""
        stages: list[list[int]] = []
        for i, spec in enumerate(self.arch.convs):
            if i == 0 or not spec.own_tower_only and self.arch.towers > 1:
                stages.append([])
            stages[-1].append(i)
        return stages

    def run_convs(self, x: Tensor, indices: list[int]) -> Tensor:
        for i in indices:
            spec = self.arch.convs[i]
            if isinstance(spec.padding, tuple):
                x = F.pad(x, spec.padding)
            x = F.relu(getattr(self, spec.name)(x), inplace=True)
            if spec.lrn:
                x = self.lrn(x)
            if spec.pool:
                x = F.max_pool2d(x, 3, 2)
        return x

    def features(self, x: Tensor) -> Tensor:
        """All conv stages back to back (no links): the one-device net, or the weird-trick column."""
        for stage in self.conv_stages():
            x = self.run_convs(x, stage)
        return x.flatten(1)

    # -- the fully connected layers --

    def hidden(self, x: Tensor, layer: int, dropout: DropoutMasks | None) -> Tensor:
        """fc6 (layer 0) or fc7 (layer 1) on this piece's units: ReLU, then dropout while training."""
        return self.activate(getattr(self, FC_NAMES[layer])(x), layer, dropout)

    def activate(self, x: Tensor, layer: int, dropout: DropoutMasks | None) -> Tensor:
        """What follows fc6's or fc7's product on this piece's units: ReLU, then dropout while training."""
        x = F.relu(x, inplace=True)
        if not self.training:
            return x
        if dropout is None:
            return F.dropout(x, DROPOUT, training=True)
        units_total = self.arch.fc_units[layer]
        return dropout.apply(x, layer, units_total, rows(units_total, *self.piece.fc_shard))

    def forward(self, x: Tensor, dropout: DropoutMasks | None = None) -> Tensor:
        """The whole net on one device. Pieces of it are run by the strategies, through links."""
        if self.piece != Piece():
            raise RuntimeError("a tower or FC shard runs inside a strategy; only the whole net has forward()")
        x = self.hidden(self.features(x), 0, dropout)
        return self.fc8(self.hidden(x, 1, dropout))


class AlexNet2012(AlexNet):
    """The 2012 paper's network on one device: conv2/4/5 as groups=2 convs, LRN per tower."""

    def __init__(self, num_classes: int = 1000, lrn_alpha: float = 1e-4) -> None:
        super().__init__(PAPER, num_classes, lrn_alpha=lrn_alpha)


class Tower(AlexNet):
    """One tower of the paper's net: 48/128/192/192/128 conv channels, 2048 fc6 and fc7 units,
    and the whole fc8 on tower 0."""

    def __init__(self, index: int, num_classes: int = 1000, lrn_alpha: float = 1e-4) -> None:
        super().__init__(PAPER, num_classes, Piece(index, (index, PAPER.towers)), lrn_alpha)


class AlexNetOWT(AlexNet):
    """The one-column net of "One weird trick" (torchvision's AlexNet): loads torchvision's
    state_dict directly (its keys are renamed on load) and exports it with `torchvision_state_dict`."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(OWT, num_classes)
        self._register_load_state_dict_pre_hook(_rename_torchvision_keys)

    def torchvision_state_dict(self) -> dict[str, Tensor]:
        ours = {v: k for k, v in TORCHVISION_NAMES.items()}
        return {f"{ours[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in self.state_dict().items()}


def _rename_torchvision_keys(state_dict: dict, prefix: str, *args: object) -> None:
    for key in list(state_dict):
        layer, _, param = key[len(prefix):].rpartition(".")
        if layer in TORCHVISION_NAMES:
            state_dict[f"{prefix}{TORCHVISION_NAMES[layer]}.{param}"] = state_dict.pop(key)


def build_model(arch: str = "paper", num_classes: int = 1000) -> AlexNet:
    """The whole net of an architecture on one device."""
    return AlexNet2012(num_classes) if arch == "paper" else AlexNetOWT(num_classes)


# -- state_dict conversions: every piece's parameter is a row block of the whole net's --

INITS = ("paper", "he")


def initial_state_dict(arch: Architecture, num_classes: int, seed: int, init: str = "paper") -> dict[str, Tensor]:
    """The whole net's initial weights for a seed: every layout slices its pieces from these."""
    torch.manual_seed(seed)
    return AlexNet(arch, num_classes, init=init).state_dict()


def full_shapes(arch: Architecture, num_classes: int) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {key: value.shape for key, value in AlexNet(arch, num_classes).state_dict().items()}


def shard_state_dict(full: Mapping[str, Tensor], arch: Architecture, piece: Piece) -> dict[str, Tensor]:
    """The part of a whole-net state_dict that `piece` holds."""
    blocks = {key: piece.block(key, arch, value.shape[0]) for key, value in full.items()}
    return {key: full[key][block].clone() for key, block in blocks.items() if block is not None}


def merge_state_dicts(pieces: list[tuple[Piece, Mapping[str, Tensor]]], arch: Architecture,
                      num_classes: int) -> dict[str, Tensor]:
    """The whole-net state_dict from the state_dicts of pieces that together hold all of it.
    Replicated parameters (the weird-trick conv column) are taken from the last piece holding them."""
    shapes = full_shapes(arch, num_classes)
    first = pieces[0][1]
    merged = {key: first[key].new_empty(shape) for key, shape in shapes.items()}
    for piece, state in pieces:
        for key, value in state.items():
            merged[key][piece.block(key, arch, shapes[key][0])] = value
    return merged


def towers_to_full(tower0: Mapping[str, Tensor], tower1: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An `AlexNet2012` state_dict from the two towers' state_dicts."""
    num_classes = tower0["fc8.weight"].shape[0]
    return merge_state_dicts([(Piece(0, (0, 2)), tower0), (Piece(1, (1, 2)), tower1)], PAPER, num_classes)


def full_to_towers(full: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The two towers' state_dicts from an `AlexNet2012` state_dict."""
    return (shard_state_dict(full, PAPER, Piece(0, (0, 2))), shard_state_dict(full, PAPER, Piece(1, (1, 2))))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
