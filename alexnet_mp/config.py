"""What defines a training run: every flag of `train`, as one frozen record that each part of the program reads
(the command line fills it in: arguments.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from alexnet_mp.speed import Speed

PAPER_BATCH = 128
DECODE_PLACES = ("workers", "device", "device-in-workers")  # where JPEGs are decoded; docs/running.md
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # "no": float32
# What decides step N's samples, augmentation and dropout masks (docs/architecture.md): a resume that
# changes one continues the run on other batches than the straight run would have drawn.
SAMPLE_STREAM = ("seed", "batch_size", "data", "dataset", "synthetic_size")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "paper-split"
    arch: str = "paper"
    init: str = "paper"
    options: Mapping[str, Any] = field(default_factory=dict)  # the layout's own settings given (strategies/)
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
    warmup_steps: int = 0  # linear warm-up of the learning rate over the first N steps; 0: none (the paper's)
    lr_schedule: str = "plateau"
    lr_step_epochs: int = 30
    plateau_patience: int = 1
    seed: int = 0
    workers: int = 2
    decode_on: str = "workers"
    max_bad_images: int | None = None  # unreadable training images tolerated; None: 0.1% of the set
    eval_every: int = 0  # steps; 0: at the end of each epoch only
    ten_crop: bool = False
    checkpoint_every: int = 0  # steps; checkpoints are also written at each epoch's end and the run's last step
    keep_checkpoints: int = 3
    save_checkpoints: bool = True  # False: --no-checkpoints, none written at all
    resume: str | None = None
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    triton_lrn: bool = False
    log_every: int = 1
    trace: bool = False  # a timeline of a few steps on every rank: OUTPUT/trace.json (trace.py)
    timeout_s: float = 600.0
    output_dir: str = "runs/latest"
    tracker: str = "none"
    project: str | None = None  # None: W&B's WANDB_PROJECT, else alexnet-mp
    group: str | None = None
    run_name: str | None = None

    @property
    def scaled_lr(self) -> float:
        """--lr for a global batch of 128 (the paper's), scaled to --batch-size as --lr-scaling says."""
        return self.lr_for(self.batch_size)

    def lr_for(self, batch: int) -> float:
        """--lr scaled as --lr-scaling says for an update that averages over `batch` samples."""
        ratio = batch / PAPER_BATCH
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_scaling]

    def to_dict(self) -> dict:
        """Every setting as one flat record (config.json, W&B's config, a checkpoint's meta.json): the layout's
        options beside the others, as their flags are."""
        settings = asdict(self)
        options = settings.pop("options")
        return {**settings, **options}

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
