"""Datasets, the paper's preprocessing, and the global-batch sampler.

For step s the global batch is a fixed slice of a permutation drawn from (seed, epoch); every layout
and world size sees the same global batch, and each rank loads only its rows of it. A sample's
random augmentation is drawn from (seed, epoch, sample index), so it looks the same whichever rank
loads it. Labels come from the dataset's `targets`, so a rank can hold labels for rows whose images
it does not load (weird-trick rank 0 computes the loss over the whole global batch).

Images are decoded by the loader's workers, or left encoded there and decoded a batch in one call on
the device the batch is going to (on a GPU by nvJPEG, through TorchCodec or torchvision): by the
training process (`decode_on="device"`), or by each worker in its own process (`"device-in-workers"`),
whose host work and waits then hold up neither the training process nor each other.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets
from torchvision.transforms import v2

from alexnet_mp.config import DECODE_PLACES
from alexnet_mp.errors import UsageError
from alexnet_mp.model import IMAGE_SIZE
from alexnet_mp.rng import seeded_generator

log = logging.getLogger(__name__)
T = TypeVar("T")

RESIZE = 256  # §2: shorter side rescaled to 256, central 256x256 patch
# Per-channel statistics of ImageNet's training set, RGB in [0, 1] (the values torchvision's and
# pytorch/examples' ImageNet recipes use). The paper subtracts the mean image; we subtract the
# per-channel mean and divide by the std (docs/reproduction.md).
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The principal components of ImageNet's RGB pixel values in [0, 1], for the paper's "PCA colour
# augmentation" (§4.1): from fb.resnet.torch, datasets/imagenet.lua (Facebook AI Research, 2016).
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
CLASS_COLOUR = 2.0  # synthetic set: the class colour cast's scale, in normalised units
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")
DEVICE_JPEG_MODES = ("RGB", "L")  # JPEGs nvJPEG turns into the RGB PIL gives; CMYK and the rest: the workers


@dataclass(frozen=True)
class Draws:
    """A training sample's random augmentation (§4.1): a 224x224 crop of the central 256x256, a
    horizontal flip, and the PCA lighting's alpha ~ N(0, 0.1) per component. Drawn from (seed, epoch,
    index) alone, so a sample looks the same whichever rank or loader worker loads it."""

    top: int
    left: int
    flip: bool
    alpha: tuple[float, float, float]

    @classmethod
    def of(cls, seed: int, epoch: int, index: int) -> Draws:
        generator = seeded_generator(seed, 5, epoch, index)
        top, left = torch.randint(0, RESIZE - IMAGE_SIZE + 1, (2,), generator=generator).tolist()
        flip = bool(torch.rand((), generator=generator) < 0.5)
        alpha = (LIGHTING_STD * torch.randn(3, generator=generator)).tolist()
        return cls(top, left, flip, (alpha[0], alpha[1], alpha[2]))


def central_pixels(images: Tensor) -> Tensor:
    """§2: the shorter side rescaled to 256, the central 256x256 patch; uint8 [..., 3, H, W] to
    [..., 3, 256, 256]."""
    pixels = v2.functional.resize(images, [RESIZE], antialias=True)
    return v2.functional.center_crop(pixels, [RESIZE])


def train_crop(central: Tensor, draws: Draws) -> Tensor:
    """The training crop and flip of an image's central pixels, still uint8: colour work is left to
    the device (`normalise`)."""
    pixels = central[:, draws.top:draws.top + IMAGE_SIZE, draws.left:draws.left + IMAGE_SIZE]
    return pixels.flip(-1) if draws.flip else pixels


def eval_crops(central: Tensor, ten_crop: bool = False) -> Tensor:
    """Centre crop [3, H, W], or the paper's ten crops (4 corners + centre, and their mirror images):
    [10, 3, H, W]; uint8."""
    if ten_crop:
        return torch.stack(v2.functional.ten_crop(central, [IMAGE_SIZE]))
    return v2.functional.center_crop(central, [IMAGE_SIZE])


@functools.cache
def _colour_constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(eigenvalue-scaled eigenvectors [3, 3], mean [3, 1, 1], std [3, 1, 1]) on `device`, copied there
    once: a copy per batch would make the host wait for the device."""
    components = torch.tensor(PCA_EIGENVECTORS) * torch.tensor(PCA_EIGENVALUES)  # column j: eigvec_j * eigval_j
    return (components.to(device), torch.tensor(MEAN).view(3, 1, 1).to(device),
            torch.tensor(STD).view(3, 1, 1).to(device))


def lighting_shift(alphas: Tensor) -> Tensor:
    """The paper's PCA colour augmentation: eigvec @ (alpha * eigval), one RGB shift per image [..., 3]."""
    components, _, _ = _colour_constants(alphas.device)
    return alphas @ components.T


def normalise(pixels: Tensor, alphas: Tensor) -> Tensor:
    """uint8 pixels [B, (crops,) 3, H, W] to the net's input: scaled to [0, 1], shifted by each image's
    PCA lighting (alphas [B, 3]; zeros for validation), normalised per channel. Run where the batch
    is going: on a GPU it takes the float work off the loader's cores and sends 4x fewer bytes."""
    _, mean, std = _colour_constants(pixels.device)
    shift = lighting_shift(alphas.float()).reshape(len(alphas), *[1] * (pixels.dim() - 4), 3, 1, 1)
    return (pixels.float() / 255 + shift - mean) / std


class SyntheticImages(Dataset):
    """A deterministic, learnable, class-conditional image set, made on the fly: each class is a
    colour cast (a random RGB offset of about 2 standard deviations, which any conv stack picks up
    early) over a smooth random pattern; a sample is its class's image, randomly shifted and flipped,
    plus noise. Already normalised and 224x224, so the main job runs anywhere with no data. With
    `ten_crop` (validation), a sample is the paper's ten crops of its class's whole 256x256 image plus noise."""

    unreadable = torch.zeros(0, dtype=torch.bool)  # made, never read: no image to flag (Augmented's)

    def __init__(self, num_classes: int = 1000, size: int = 4096, seed: int = 0, split: int = 0,
                 noise: float = 1.0, ten_crop: bool = False) -> None:
        self.num_classes, self.size, self.seed, self.split, self.noise = num_classes, size, seed, split, noise
        self.ten_crop = ten_crop
        self.classes = [f"class{c:04d}" for c in range(num_classes)]
        self.targets = torch.randint(0, num_classes, (size,), generator=seeded_generator(seed, 1, split))
        coarse = torch.randn(num_classes, 3, 8, 8, generator=seeded_generator(seed, 2))
        colours = CLASS_COLOUR * torch.randn(num_classes, 3, 1, 1, generator=seeded_generator(seed, 4))
        self.patterns = colours + F.interpolate(coarse, size=IMAGE_SIZE + 32, mode="bicubic", align_corners=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(normalised float image, no lighting): float images leave `normalise` out."""
        index, epoch = key
        generator = seeded_generator(self.seed, 3, self.split, epoch, index)
        if self.ten_crop:
            whole = self.patterns[int(self.targets[index])]
            return eval_crops(whole + self.noise * torch.randn(whole.shape, generator=generator), True), torch.zeros(3)
        top, left = torch.randint(0, 33, (2,), generator=generator).tolist()
        image = self.patterns[int(self.targets[index]), :, top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image + self.noise * torch.randn(image.shape, generator=generator), torch.zeros(3)


@dataclass(frozen=True)
class Encoded:
    """A sample whose JPEG is left for the device to decode: the file's bytes, the crops to take of its
    central pixels (`train_crop` with the sample's draws, or `eval_crops`), and its index, to fall
    back on if the device's decoder refuses it. Bytes, not a tensor: a worker would hand each tensor over
    through a shared-memory file descriptor, hundreds per batch."""

    jpeg: bytes
    crop: Callable[[Tensor], Tensor]
    index: int


def collate(samples: list[tuple[Tensor | Encoded, Tensor]],
            decode: Callable[[list[Tensor | Encoded]], Tensor] | None = None
            ) -> tuple[Tensor | list[Tensor | Encoded], Tensor]:
    """Stacked (pixels, alphas) as usual. A batch with encoded samples stays a list until it is decoded,
    unless a worker decodes it here (`decode`): then its uint8 pixels come back to host memory, to
    cross to the training process like any batch."""
    if not any(isinstance(pixels, Encoded) for pixels, _ in samples):
        return default_collate(samples)
    pixels, alphas = [pixels for pixels, _ in samples], torch.stack([alpha for _, alpha in samples])
    return (pixels if decode is None else decode(pixels).cpu()), alphas


class Augmented(Dataset):
    """Images from `source` (an `ImageSource`) as uint8 crops with their lighting alphas: training
    samples with their `Draws`, validation samples centre- or ten-cropped with no lighting. With
    `decode_on="device"`, JPEGs come out as `Encoded` bytes and `on_device` crops them once decoded.
    A corrupt image is replaced by the next readable image of the same class, counted and warned once."""

    unreadable: Tensor  # one flag per image, in shared memory: the loader's workers mark, the trainer counts

    def __init__(self, source: ImageSource, seed: int, train: bool, ten_crop: bool = False,
                 decode_on: str = "workers") -> None:
        self.source, self.seed, self.train, self.ten_crop = source, seed, train, ten_crop
        self.decode_on = decode_on
        self.targets, self.classes = source.targets, source.classes
        self.num_classes = len(source.classes)
        self.unreadable = torch.zeros(len(self.targets), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor | Encoded, Tensor]:
        index, epoch = key
        if not self.train:
            crop, alpha = functools.partial(eval_crops, ten_crop=self.ten_crop), torch.zeros(3)
        else:
            draws = Draws.of(self.seed, epoch, index)
            crop, alpha = functools.partial(train_crop, draws=draws), torch.tensor(draws.alpha)
        return self._readable(index, functools.partial(self._pixels_or_jpeg, crop=crop)), alpha

    def on_device(self, samples: list[Tensor | Encoded], device: torch.device) -> Tensor:
        """A batch's samples stacked on `device`: the encoded ones decoded there in one call (nvJPEG on
        a GPU), then resized and cropped there. One the decoder refuses is read as the workers read it."""
        encoded = [sample for sample in samples if isinstance(sample, Encoded)]
        central = iter(_central_by_size(_decode_jpegs([sample.jpeg for sample in encoded], device)))
        pixels = []
        for sample in samples:
            if isinstance(sample, Encoded):
                image = next(central)
                sample = (sample.crop(image) if image is not None
                          else self._readable(sample.index, functools.partial(self._pixels, crop=sample.crop)))
            pixels.append(sample.to(device))
        return torch.stack(pixels)

    def _pixels(self, index: int, crop: Callable[[Tensor], Tensor]) -> Tensor:
        return crop(central_pixels(v2.functional.to_image(self.source.load(index))))

    def _pixels_or_jpeg(self, index: int, crop: Callable[[Tensor], Tensor]) -> Tensor | Encoded:
        jpeg = self.source.jpeg(index) if self.decode_on != "workers" else None
        return Encoded(jpeg, crop, index) if jpeg is not None else self._pixels(index, crop)

    def _readable(self, index: int, read: Callable[[int], T]) -> T:
        """read(index), or read of the next readable image of its class."""
        label, size = self.targets[index], len(self.targets)
        for step in range(size):
            candidate = (index + step) % size
            if self.targets[candidate] != label:
                continue
            try:
                return read(candidate)
            except (OSError, UnidentifiedImageError, ValueError):
                if not self.unreadable[candidate]:
                    self.unreadable[candidate] = True
                    log.warning("skipping unreadable image %s (%d skipped so far)", self.source.describe(candidate),
                                int(self.unreadable.sum()))
        raise UsageError(f"class {self.classes[label]!r} has no readable image: replace its files, or remove its "
                         "folder from train/ and val/")


JpegDecoder = Callable[[list[bytes], torch.device], list[Tensor]]


@functools.cache
def jpeg_decoder() -> JpegDecoder | None:
    """A batched JPEG decoder to uint8 RGB [3, H, W] on a device (nvJPEG on a GPU): TorchCodec's where
    it has one (0.16 and later), else torchvision's (deprecated since torchvision 0.29 in TorchCodec's
    favour, but the only one beside a torch older than TorchCodec's decoder, such as 2.11); None if neither."""
    try:
        from torchcodec.decoders import decode_jpeg
        return lambda jpegs, device: decode_jpeg(jpegs, mode="RGB", device=device)
    except (ImportError, RuntimeError, OSError):
        pass
    from torchvision import io as tv_io
    if not hasattr(tv_io, "decode_jpeg"):
        return None
    return lambda jpegs, device: tv_io.decode_jpeg(
        [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs], mode=tv_io.ImageReadMode.RGB,
        device=device)


def _decode_jpegs(jpegs: list[bytes], device: torch.device) -> list[Tensor | None]:
    """JPEG bytes decoded on `device`, all in one call; if that call fails, one by one, with None for each
    image the decoder refuses (a truncated file, say)."""
    if not jpegs:
        return []
    decode = jpeg_decoder()  # not None: require_device_decoder() ran before any batch
    try:
        return decode(jpegs, device)
    except RuntimeError:
        decoded: list[Tensor | None] = []
        for jpeg in jpegs:
            try:
                decoded.append(decode([jpeg], device)[0])
            except RuntimeError:
                decoded.append(None)
        return decoded


def _central_by_size(images: list[Tensor | None]) -> list[Tensor | None]:
    """`central_pixels` of each decoded image (None stays None), resized in one call per image size:
    photos come in a few sizes, and a GPU would otherwise run a handful of small kernels per image."""
    central: list[Tensor | None] = [None] * len(images)
    by_size: dict[torch.Size, list[int]] = {}
    for i, image in enumerate(images):
        if image is not None:
            by_size.setdefault(image.shape, []).append(i)
    for members in by_size.values():
        for i, pixels in zip(members, central_pixels(torch.stack([images[i] for i in members])), strict=True):
            central[i] = pixels
    return central


def require_device_decoder() -> None:
    """Refuse `--decode-on device` in one line when no JPEG decoder can run on a device, before any
    worker starts."""
    if jpeg_decoder() is None:
        raise UsageError("--decode-on device needs TorchCodec: pip install 'alexnet-mp[device-decode]', "
                         "or use --decode-on workers")


class ImageSource:
    """Where images come from: `load(index)`, `describe(index)`, `targets`, `classes`, and `jpeg(index)`
    for sources that hold JPEG files a device can decode."""

    targets: np.ndarray  # int64, one per image
    classes: list[str]

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def jpeg(self, index: int) -> bytes | None:
        """The file's bytes if it is a JPEG the device's decoder turns into what `load` gives, else None."""
        return None

    def describe(self, index: int) -> str:
        return f"#{index}"


class FolderSource(ImageSource):
    """An ImageFolder tree (one sub-folder per class, JPEG or PNG files), as ImageNet is laid out."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise UsageError(f"no image folder at {root}: expected {root}/<class>/<image>.jpg")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            if any(_is_image(f.name) for f in root.iterdir()):
                raise UsageError(f"{root} holds images but no class folders: sort them into {root}/<class>/ "
                                 "(ImageNet's validation archive unpacks flat; docs/reproduction.md says how)")
            raise UsageError(f"{root} has no class folders: expected {root}/<class>/<image>.jpg")
        empty = [c for c in classes if not any(_is_image(f.name) for f in (root / c).iterdir())]
        if empty:
            raise UsageError(f"class folder {root / empty[0]} has no JPEG or PNG images; add some or remove it")
        folder = datasets.ImageFolder(str(root), allow_empty=False,
                                      is_valid_file=lambda path: _is_image(os.path.basename(path)))
        # Arrays, not lists of Python objects: a forked loader worker that reads a list's items writes their
        # reference counts, which copies their pages into every worker (docs/results/choices.md has the figures).
        self.root, self.classes = root, folder.classes
        prefix = len(os.path.join(str(root), ""))  # ImageFolder's paths are root/class/file
        self.files = np.array([os.fsencode(path[prefix:]) for path, _ in folder.samples])
        self.targets = np.array(folder.targets, dtype=np.int64)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.files[index]))

    def load(self, index: int) -> Image.Image:
        with Image.open(self.path(index)) as image:
            return image.convert("RGB")

    def jpeg(self, index: int) -> bytes | None:
        data = Path(self.path(index)).read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # the header only: a file PIL cannot open is skipped
            usable = image.format == "JPEG" and image.mode in DEVICE_JPEG_MODES
        return data if usable else None

    def describe(self, index: int) -> str:
        return self.path(index)


def _is_image(name: str) -> bool:
    """A JPEG or PNG by its name. Hidden files are not: a folder copied from a Mac holds an AppleDouble file
    `._NAME.JPEG` of metadata beside each image, which would be read, skipped and warned about one by one."""
    return name.endswith(IMAGE_SUFFIXES) and not name.startswith(".")


class CifarSource(ImageSource):
    """CIFAR-10's python batches (data_batch_1..5, test_batch, batches.meta) read from local disk."""

    def __init__(self, root: Path, train: bool) -> None:
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        missing = [name for name in names + ["batches.meta"] if not (folder / name).is_file()]
        if missing:
            raise UsageError(f"CIFAR-10 files missing in {folder}: {', '.join(missing)} "
                             "(expected the python version, cifar-10-python.tar.gz, extracted)")
        label_names = _unpickle(folder / "batches.meta", b"label_names")[b"label_names"]
        if not (isinstance(label_names, list) and label_names and all(isinstance(n, bytes) for n in label_names)):
            raise UsageError(f"{folder / 'batches.meta'} holds no list of class names; re-extract the archive")
        self.classes = [name.decode(errors="replace") for name in label_names]
        batches = [_cifar_batch(folder / name, len(self.classes)) for name in names]
        self.images = np.concatenate([images for images, _ in batches])
        self.targets = np.concatenate([labels for _, labels in batches])

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def _latin1(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it for bytes (CIFAR's batches were written by Python 2)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"bytes encoded as {encoding!r}, not latin1")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for what a CIFAR-10 python batch holds (dicts, lists, bytes, str, numbers and numpy arrays)
    and nothing else: a pickle may name any importable callable, which loading calls, so a crafted batch could
    run code through the standard one."""

    # numpy's own (re)constructors of arrays, under the module names numpy 1 and 2 pickle them with
    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        **{(module, "_reconstruct"): np.zeros(1).__reduce__()[0]
           for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
        **{(module, "_frombuffer"): np.zeros(1).__reduce_ex__(5)[0]
           for module in ("numpy.core.numeric", "numpy._core.numeric")},
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR-10 batch does not hold")
        return self.ALLOWED[module, name]


def _cifar_batch(path: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 32, 32, 3] uint8, labels [N] int64) of a CIFAR-10 batch, its rows of 3072 channel-major bytes."""
    batch = _unpickle(path, b"data", b"labels")
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"{path} is not a CIFAR-10 python batch (its data is {found}, not rows of 3072 bytes); "
                         "re-extract the archive")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(type(label) is int and 0 <= label < classes for label in labels)):
        raise UsageError(f"{path} is not a CIFAR-10 python batch (not one label in 0..{classes - 1} per image); "
                         "re-extract the archive")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(labels, dtype=np.int64)


def _unpickle(path: Path, *keys: bytes) -> dict:
    """A CIFAR-10 python batch holding `keys`, read with `_CifarUnpickler`; a cut, foreign or crafted file is
    one clear error."""
    try:
        with path.open("rb") as file:
            batch = _CifarUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise UsageError(f"{path} is not a CIFAR-10 python batch ({error}); re-extract the archive") from None
    except MemoryError:  # a length field the file cannot hold, not a run too large for the host
        raise UsageError(f"{path} is not a CIFAR-10 python batch (it gives a length past any memory); re-extract "
                         "the archive") from None
    missing = [key.decode() for key in keys if not isinstance(batch, dict) or key not in batch]
    if missing:
        raise UsageError(f"{path} is not a CIFAR-10 python batch (no {', '.join(missing)}); re-extract the archive")
    return batch


@dataclass(frozen=True)
class GlobalBatches:
    """The global batch of each step: epoch e's permutation comes from (seed, e). An epoch is its whole
    batches; with `fill_last`, the last batch is filled up with the order's first samples, so that every
    sample is in one (validation: see `scored`)."""

    dataset_size: int
    batch_size: int
    seed: int
    shuffle: bool = True
    fill_last: bool = False

    @property
    def steps_per_epoch(self) -> int:
        whole, part = divmod(self.dataset_size, self.batch_size)
        return whole + bool(part and self.fill_last)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> Tensor:
        positions = self.positions(step) % self.dataset_size
        return _epoch_order(self.dataset_size, self.seed, self.epoch(step))[positions] if self.shuffle else positions

    def positions(self, step: int) -> Tensor:
        """The positions in its epoch's order of step's global batch, one per row."""
        start = step % self.steps_per_epoch * self.batch_size
        return torch.arange(start, start + self.batch_size)

    def scored(self, step: int, rows: slice) -> Tensor:
        """Which of step's global batch's `rows` are the samples they stand for, not the last batch's fill."""
        return self.positions(step)[rows] < self.dataset_size


@functools.lru_cache(maxsize=2)
def _epoch_order(dataset_size: int, seed: int, epoch: int) -> Tensor:
    """Epoch `epoch`'s permutation, drawn once (the sampler and the labels both read it every step)."""
    return torch.randperm(dataset_size, generator=seeded_generator(seed, 4, epoch))


class _RowSampler:
    """Yields, step by step, (index, epoch) keys of this rank's rows of each global batch."""

    def __init__(self, batches: GlobalBatches, rows: slice, start: int, stop: int) -> None:
        self.batches, self.rows, self.start, self.stop = batches, rows, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            epoch = self.batches.epoch(step)
            yield [(int(i), epoch) for i in self.batches.indices(step)[self.rows]]

    def __len__(self) -> int:
        return self.stop - self.start


def _worker_started(worker_id: int) -> None:
    """A loader worker leaves stopping to its training process, which finishes the step in hand and writes a
    checkpoint on a stop: a worker ended first would end the run mid-step, with no checkpoint. Ctrl-C in a
    terminal and torchrun signal the rank's process group: in a session of its own the worker is out of their
    reach. A one-process `accelerate launch` passes a stop to every process below it, and Slurm signals each
    process of the job: a worker ignores a SIGTERM from any process but its training process, which is how the
    loader ends a worker that does not stop when told. A worker whose training process is gone ends itself."""
    os.setsid()
    training_process = os.getppid()
    # every thread of the worker blocks SIGTERM (threads started later inherit the mask); one waits for it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def obey_training_process_only() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == training_process or os.getppid() != training_process:
                os._exit(0)

    threading.Thread(target=obey_training_process_only, name="sigterm-from-loader", daemon=True).start()


def rank_batches(dataset: Dataset, batches: GlobalBatches, image_rows: slice, label_rows: slice,
                 start: int, stop: int, workers: int, device: torch.device) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(step, images of image_rows, labels of label_rows) for steps start..stop-1, both on `device`.
    uint8 pixels are normalised on the device (`normalise`). Labels reach a GPU from pinned memory
    without a wait: a copy from pageable memory would hold the host until the GPU had finished the step
    before, and with it the preparation of the next batch."""
    cuda = device.type == "cuda"
    targets = torch.as_tensor(dataset.targets)
    for step, (images, alphas) in zip(range(start, stop), _images(dataset, batches, image_rows, start, stop, workers,
                                                                    device), strict=True):
        if isinstance(images, list):  # JPEGs left encoded for the device
            images = dataset.on_device(images, device)
        images = images.to(device, non_blocking=cuda)
        if images.dtype == torch.uint8:
            images = normalise(images, alphas.to(device, non_blocking=cuda))
        labels = targets[batches.indices(step)[label_rows]]
        yield step, images, labels.pin_memory().to(device, non_blocking=True) if cuda else labels


def _images(dataset: Dataset, batches: GlobalBatches, rows: slice, start: int, stop: int, workers: int,
            device: torch.device) -> Iterator[tuple[Tensor | list, Tensor]]:
    """(pixels, lighting alphas) of `rows` of each step's global batch, from a DataLoader; empty tensors, without
    one, on a rank that takes no images (a pipeline's later stages)."""
    if rows.stop <= rows.start:
        return itertools.repeat((torch.empty(0), torch.empty(0, 3)), stop - start)
    in_workers = workers > 0 and isinstance(dataset, Augmented) and dataset.decode_on == "device-in-workers"
    decode = functools.partial(dataset.on_device, device=device) if in_workers else None
    loader = DataLoader(dataset, batch_sampler=_RowSampler(batches, rows, start, stop), num_workers=workers,
                        collate_fn=functools.partial(collate, decode=decode), pin_memory=device.type == "cuda",
                        persistent_workers=False,
                        worker_init_fn=_worker_started,
                        # spawned: a forked child of a process that uses CUDA cannot use CUDA itself
                        multiprocessing_context="spawn" if in_workers else None)
    return _refusals_unwrapped(loader)


def _refusals_unwrapped(loader: DataLoader) -> Iterator:
    """The loader's batches. A refusal raised in a worker reaches this process as a UsageError whose message is
    "Caught UsageError in DataLoader worker process N." and the worker's traceback: re-raised with the worker's
    own one-line message, which ends the traceback's last line."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UsageError as error:
            lines = str(error).strip().splitlines()
            if len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
                raise UsageError(lines[-1].split(": ", 1)[-1]) from None
            raise
        yield batch


@dataclass(frozen=True)
class DataSpec:
    data: str = "synthetic"
    dataset: str = "imagefolder"
    num_classes: int | None = None
    synthetic_size: int = 4096
    ten_crop: bool = False
    decode_on: str = "workers"


def _sources(root: Path, dataset: str) -> tuple[ImageSource, ImageSource]:
    """The training and validation images under `root`."""
    if dataset == "cifar10":
        return CifarSource(root, train=True), CifarSource(root, train=False)
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder; give a folder with train/ and val/ class folders, "
                         "or --data synthetic")
    return FolderSource(root / "train"), FolderSource(root / "val")


def build_datasets(spec: DataSpec, seed: int) -> tuple[Dataset, Dataset]:
    """(training set, validation set). Bad paths raise UsageError before any training starts."""
    if spec.decode_on not in DECODE_PLACES:
        raise UsageError(f"--decode-on {spec.decode_on!r}: choose one of {', '.join(DECODE_PLACES)}")
    if spec.decode_on != "workers":
        require_device_decoder()
    if spec.data == "synthetic":
        classes = spec.num_classes or 1000
        return (SyntheticImages(classes, spec.synthetic_size, seed, split=0),
                SyntheticImages(classes, max(spec.synthetic_size // 8, 64), seed, split=1, ten_crop=spec.ten_crop))
    root = Path(spec.data)
    try:
        train, val = _sources(root, spec.dataset)
    except PermissionError as error:  # a folder or file this user may not read
        raise UsageError(f"{error.filename or root} cannot be read ({error.strerror}): give this user read access to "
                         "the data") from None
    if val.classes != train.classes:  # labels are class folders' positions: they would mean other classes
        differ = sorted(set(train.classes) ^ set(val.classes))
        raise UsageError(f"{root}/train and {root}/val have different class folders ({', '.join(differ[:3])}"
                         f"{', ...' if len(differ) > 3 else ''}): give both the same classes")
    if spec.num_classes not in (None, len(train.classes)):
        raise UsageError(f"{root} has {len(train.classes)} classes, but {spec.num_classes} are asked for (by "
                         "--num-classes, or by the checkpoint evaluated): give data and class count that agree")
    return (Augmented(train, seed, train=True, decode_on=spec.decode_on),
            Augmented(val, seed, train=False, ten_crop=spec.ten_crop, decode_on=spec.decode_on))
