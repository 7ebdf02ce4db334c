"""Everything that defines a training run, and the command line that fills it in."""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn, TextIO, TypeVar

import torch

from alexnet_mp import checkpoint
from alexnet_mp.data import DECODE_PLACES
from alexnet_mp.errors import UsageError
from alexnet_mp.model import ARCHITECTURES, INITS
from alexnet_mp.speed import Speed
from alexnet_mp.strategies import STRATEGIES, Setup
from alexnet_mp.strategies import check as check_layout
from alexnet_mp.tracking import require_tracker, writing

PAPER_BATCH = 128
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # "no": float32
# What decides step N's samples, augmentation and dropout masks (docs/architecture.md): a resume that
# changes one continues the run on other batches than the straight run would have drawn.
SAMPLE_STREAM = ("seed", "batch_size", "data", "dataset", "synthetic_size")
N = TypeVar("N", int, float)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the program's other refusals (a usage block of 40 options
    buries what was wrong): raised as a UsageError, which the command line prints with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def number(kind: Callable[[str], N], lowest: N, exclusive: bool = False) -> Callable[[str], N]:
    """An argparse type: a `kind` of at least `lowest` (more than it if `exclusive`), refused while the
    command line is read, before anything runs."""
    def parse(text: str) -> N:
        value = kind(text)
        if value < lowest or (exclusive and value == lowest):
            raise argparse.ArgumentTypeError(f"must be {'more than' if exclusive else 'at least'} {lowest:g}, "
                                             f"not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


COUNT, POSITIVE_INT = number(int, 0), number(int, 1)  # e.g. --workers, --batch-size
NON_NEGATIVE_FLOAT, POSITIVE_FLOAT = number(float, 0.0), number(float, 0.0, exclusive=True)  # --lr, --timeout


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "paper-split"
    arch: str = "paper"
    init: str = "paper"
    exchange: str | None = None
    data: str = "synthetic"
    dataset: str = "imagefolder"
    num_classes: int | None = None  # None: the dataset's (1000 for synthetic, like ImageNet)
    synthetic_size: int = 4096
    batch_size: int = 128  # the global batch, whatever the layout
    epochs: int = 90
    steps: int | None = None  # the whole run's length in steps; overrides --epochs
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_scaling: str = "none"
    lr_schedule: str = "plateau"
    lr_step_epochs: int = 30
    plateau_patience: int = 1
    seed: int = 0
    workers: int = 2
    decode_on: str = "workers"
    eval_every: int = 0  # steps; 0: at the end of each epoch only
    ten_crop: bool = False
    checkpoint_every: int = 0  # steps; checkpoints are also written at each epoch's end and the run's last step
    keep_checkpoints: int = 3
    resume: str | None = None
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    triton_lrn: bool = False
    log_every: int = 1
    timeout_s: float = 600.0
    output_dir: str = "runs/latest"
    tracker: str = "none"
    project: str = "alexnet-mp"
    group: str | None = None
    run_name: str | None = None

    @property
    def scaled_lr(self) -> float:
        """--lr for a global batch of 128 (the paper's), scaled to --batch-size as --lr-scaling says."""
        ratio = self.batch_size / PAPER_BATCH
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scaling]

    def to_dict(self) -> dict:
        return asdict(self)

    def sample_stream_changes(self, saved: dict) -> list[str]:
        """The flags of `SAMPLE_STREAM` that differ from `saved` (a checkpoint's config), as 'now (was)'."""
        now = self.to_dict()
        unused = "dataset" if self.data == "synthetic" else "synthetic_size"
        return [f"--{key.replace('_', '-')} {now[key]} (was {saved[key]})" for key in SAMPLE_STREAM
                if key != unused and key in saved and saved[key] != now[key]]

    @property
    def speed(self) -> Speed:
        return Speed(self.channels_last, self.compile, self.cuda_graphs, self.triton_lrn)

    @property
    def output(self) -> Path:
        return Path(self.output_dir)

    @property
    def checkpoints(self) -> Path:
        return self.output / "checkpoints"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--mode", default=d.mode, help=f"layout: {', '.join(STRATEGIES)}")
    parser.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES),
                        help="paper: the 2012 two-tower net; owt: the one-column net of 'One weird trick'")
    parser.add_argument("--init", default=d.init, choices=INITS,
                        help="paper: N(0, 0.01), biases 1 (the 2012 recipe); he: N(0, 2/fan_in), biases 0, "
                             "which leaves chance within tens of SGD steps (docs/reproduction.md)")
    parser.add_argument("--exchange", default=d.exchange,
                        help="weird-trick only: all (scheme a), one-at-a-time (b), slice (c)")
    parser.add_argument("--data", default=d.data, help="'synthetic' (built in) or a folder")
    parser.add_argument("--dataset", default=d.dataset, choices=["imagefolder", "cifar10"],
                        help="layout of --data PATH: PATH/train and PATH/val class folders, or CIFAR-10 batches")
    parser.add_argument("--num-classes", type=POSITIVE_INT, default=d.num_classes)
    parser.add_argument("--synthetic-size", type=POSITIVE_INT, default=d.synthetic_size,
                        help="images in the synthetic training set")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=d.batch_size, help="the global batch")
    parser.add_argument("--epochs", type=POSITIVE_INT, default=d.epochs)
    parser.add_argument("--steps", type=POSITIVE_INT, default=d.steps,
                        help="length of the whole run in steps (overrides --epochs); a resumed run continues to it")
    parser.add_argument("--lr", type=NON_NEGATIVE_FLOAT, default=d.lr)
    parser.add_argument("--momentum", type=NON_NEGATIVE_FLOAT, default=d.momentum)
    parser.add_argument("--weight-decay", type=NON_NEGATIVE_FLOAT, default=d.weight_decay)
    parser.add_argument("--lr-scaling", default=d.lr_scaling, choices=["none", "linear", "sqrt"],
                        help="scale --lr by the global batch over the paper's 128: none (the flags mean what "
                             "they say), linear (Goyal et al. 2017), sqrt (Krizhevsky 2014)")
    parser.add_argument("--lr-schedule", default=d.lr_schedule, choices=["plateau", "step"],
                        help="plateau: /10 when validation top-1 error stops improving (the paper); step: /10 "
                             "every --lr-step-epochs")
    parser.add_argument("--lr-step-epochs", type=POSITIVE_INT, default=d.lr_step_epochs)
    parser.add_argument("--plateau-patience", type=COUNT, default=d.plateau_patience,
                        help="evaluations without improvement before the learning rate drops")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workers", type=COUNT, default=d.workers, help="data loader processes per rank")
    parser.add_argument("--decode-on", default=d.decode_on, choices=DECODE_PLACES,
                        help="where JPEGs are decoded, resized and cropped: by the loader's workers; on the "
                             "training device in one call per batch, by the training process (device) or by each "
                             "worker in its own process (device-in-workers; the training process with --workers 0). "
                             "nvJPEG on a GPU; needs 'alexnet-mp[device-decode]'. Other images: by the workers")
    parser.add_argument("--eval-every", type=COUNT, default=d.eval_every,
                        help="validate every N steps as well as at each epoch's end")
    parser.add_argument("--ten-crop", action="store_true", help="validate on the paper's ten crops")
    parser.add_argument("--checkpoint-every", type=COUNT, default=d.checkpoint_every,
                        help="checkpoint every N steps as well as at each epoch's end and the run's last step")
    parser.add_argument("--keep-checkpoints", type=POSITIVE_INT, default=d.keep_checkpoints)
    parser.add_argument("--resume", default=d.resume,
                        help="'latest' (in --output-dir), 'auto' (latest if there is one, else a fresh start: for a "
                             "job that may be requeued), or a checkpoint folder")
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS,
                        help="default: the launcher's (`accelerate launch --mixed_precision`, or its config file), "
                             f"else {d.mixed_precision}")
    parser.add_argument("--channels-last", action="store_true",
                        help="conv weights and maps in NHWC, the layout of cuDNN's fast (tensor core) kernels")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each conv stage between two links (LRN, ReLU, pooling fused)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the compiled stages as CUDA graphs (implies --compile; GPU only)")
    parser.add_argument("--triton-lrn", action="store_true",
                        help="LRN as hand-written Triton kernels instead of torch ops (GPU only; not float64)")
    parser.add_argument("--log-every", type=POSITIVE_INT, default=d.log_every)
    parser.add_argument("--timeout", dest="timeout_s", type=POSITIVE_FLOAT, default=d.timeout_s,
                        help="seconds a rank waits for its peers before giving up")
    parser.add_argument("--output-dir", default=d.output_dir)
    parser.add_argument("--tracker", default=d.tracker, choices=["none", "wandb", "tensorboard"])
    parser.add_argument("--project", default=d.project)
    parser.add_argument("--group", default=d.group, help="experiment name: runs compared together")
    parser.add_argument("--run-name", default=d.run_name)


def check_run(config: TrainConfig, world_size: int) -> None:
    """Refuses, before any process group or data exists, what the run cannot do on `world_size` ranks:
    a layout that cannot run there, more ranks than GPUs, a missing tracker, a GPU-only speed-up without a
    GPU, or an output folder that already holds another run or cannot be written."""
    check_layout(config.mode, world_size, Setup(config.arch, config.num_classes or 1000, config.seed,
                                                exchange=config.exchange))
    check_gpus(world_size)
    require_tracker(config.tracker)
    if config.cuda_graphs and not torch.cuda.is_available():
        raise UsageError("--cuda-graphs needs a GPU (none is visible); use --compile alone on a CPU")
    if config.triton_lrn and not (torch.cuda.is_available() and importlib.util.find_spec("triton")):
        raise UsageError("--triton-lrn needs a GPU and Triton (installed with torch's CUDA wheels); drop the flag")
    check_writable(config.output, "--output-dir")
    if not config.resume and checkpoint.complete_checkpoints(config.checkpoints):
        raise UsageError(f"{config.output} already holds a run with checkpoints: add --resume latest to continue "
                         "it, or choose another --output-dir")


def check_gpus(world_size: int) -> None:
    """Each rank on GPUs needs one of its own (NCCL puts no two ranks on one GPU): more processes on a machine
    than it has GPUs are refused in one line, where the surplus ranks failed with CUDA's "invalid device
    ordinal". Ranks that accelerate keeps on the CPU (ACCELERATE_USE_CPU) need none."""
    from accelerate.utils import parse_flag_from_env

    if world_size == 1 or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        return
    here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), torch.cuda.device_count()
    if here > gpus:
        raise UsageError(f"{here} processes on this machine, {gpus} GPU(s): each rank needs a GPU of its own; launch "
                         f"at most {gpus} per machine, or run them on the CPU with ACCELERATE_USE_CPU=1")


def check_writable(folder: Path, what: str) -> None:
    """An output folder, or the nearest folder above it that exists, must be one this user can write
    into: refused before the command's work, not when it writes its first file. `what`: the argument
    that names it, for the message."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{folder}: {existing} is not a folder this user can write to; choose another {what}")


RUN_LOCK = "run.lock"  # in OUTPUT: held by the run writing there (`hold_output`)


@contextmanager
def hold_output(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (which `check_run` found writable) while the run writing there
    lives; the main process takes it. A second run into the folder is refused in one line: the same command
    started twice, say, or a requeued job whose first attempt is still saving. The two would interleave
    their metrics, and delete each other's half-written checkpoints. It is an flock, which the kernel drops
    with its process however that ends, so a killed run leaves no stale lock. Where the file system has no
    locks, the run goes on with a warning. A run refused before it wrote anything leaves no folder behind."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / RUN_LOCK).open("a+") as lock:
        _lock(lock, folder)
        try:
            yield
        finally:  # only while holding the lock: a refused run must not remove a live one's
            if created and [path.name for path in folder.iterdir()] == [RUN_LOCK]:
                shutil.rmtree(folder)


def _lock(lock: TextIO, folder: Path) -> None:
    """Takes `lock` (the open RUN_LOCK of `folder`) and writes this process's pid and host into it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise UsageError(f"{folder} is in use by a live run ({holder}): wait for it to end, or choose another "
                         "--output-dir") from None
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {folder}'s file system has no locks ({error.strerror}): a second run into it at the "
              "same time would not be refused", file=sys.stderr)
    with writing(folder / RUN_LOCK):
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()


def train_config(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    given = {key: value for key, value in vars(args).items() if key in fields}
    return TrainConfig(**{**given, "mixed_precision": args.mixed_precision or launcher_mixed_precision()})


def launcher_mixed_precision() -> str:
    """What `accelerate launch --mixed_precision` (or its config file) asked for, which the Accelerator,
    given --mixed-precision's value, would override; "no" (float32) where no launcher says."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", TrainConfig.mixed_precision)
    if asked not in MIXED_PRECISIONS:
        raise UsageError(f"the launcher asks for mixed precision {asked!r}: this project runs one of "
                         f"{', '.join(MIXED_PRECISIONS)}; launch with one of them, or give --mixed-precision")
    return asked
