"""The command line of `train` (and of each run of an experiment): its flags, read into a `TrainConfig`.
Numbers are checked as they are read, and argparse's refusals are one line, as the program's others."""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

from alexnet_mp.config import DECODE_PLACES, MIXED_PRECISIONS, TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import COUNT, NON_NEGATIVE_FLOAT, POSITIVE_INT, SECONDS
from alexnet_mp.model import ARCH_HELP, ARCHITECTURES, INITS
from alexnet_mp.strategies import LAYOUTS, all_options


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as the program's other refusals (a usage block of 40 options
    buries what was wrong): raised as a UsageError, which the command line prints with exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see --help")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("--mode", default=d.mode, help=f"layout: {', '.join(LAYOUTS)}")
    parser.add_argument("--arch", default=d.arch, choices=sorted(ARCHITECTURES), help=ARCH_HELP)
    parser.add_argument("--init", default=d.init, choices=INITS,
                        help="paper: N(0, 0.01), biases 1 (the 2012 recipe); he: N(0, 2/fan_in), biases 0, "
                             "which leaves chance within tens of SGD steps (docs/reproduction.md)")
    add_layout_options(parser)
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
    parser.add_argument("--warmup-steps", type=COUNT, default=d.warmup_steps,
                        help="raise the learning rate linearly to --lr over the first N steps (Goyal et al. 2017); "
                             "default 0, the paper's recipe. With --init he, --lr 0.01 needs it (docs/reproduction.md)")
    parser.add_argument("--lr-schedule", default=d.lr_schedule, choices=["plateau", "step"],
                        help="plateau: /10 when validation top-1 error stops improving (the paper); step: /10 "
                             "every --lr-step-epochs")
    parser.add_argument("--lr-step-epochs", type=POSITIVE_INT, default=d.lr_step_epochs)
    parser.add_argument("--plateau-patience", type=COUNT, default=d.plateau_patience,
                        help="evaluations without improvement before the learning rate drops")
    parser.add_argument("--seed", type=COUNT, default=d.seed)
    parser.add_argument("--workers", type=COUNT, default=d.workers, help="data loader processes per rank")
    parser.add_argument("--decode-on", default=d.decode_on, choices=DECODE_PLACES,
                        help="where JPEGs are decoded, resized and cropped: by the loader's workers; on the "
                             "training device in one call per batch, by the training process (device) or by each "
                             "worker in its own process (device-in-workers; the training process with --workers 0). "
                             "nvJPEG on a GPU; needs 'alexnet-mp[device-decode]'. Other images: by the workers")
    parser.add_argument("--max-bad-images", type=COUNT, default=d.max_bad_images,
                        help="unreadable training images to skip (each replaced by the next of its class) before "
                             "the run stops; default 0.1%% of the training set")
    parser.add_argument("--eval-every", type=COUNT, default=d.eval_every,
                        help="validate every N steps as well as at each epoch's end")
    parser.add_argument("--ten-crop", action="store_true", help="validate on the paper's ten crops")
    parser.add_argument("--checkpoint-every", type=COUNT, default=d.checkpoint_every,
                        help="checkpoint every N steps as well as at each epoch's end and the run's last step")
    parser.add_argument("--keep-checkpoints", type=POSITIVE_INT, default=d.keep_checkpoints)
    parser.add_argument("--no-checkpoints", dest="save_checkpoints", action="store_false",
                        help="write no checkpoint at all (a toy run's: each is about 435 MiB for the paper net)")
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
    parser.add_argument("--trace", action="store_true",
                        help="record a timeline of a few steps after warm-up on every rank (each layer's forward and "
                             "backward, each link's wait, the data wait, the optimizer step) as OUTPUT/trace.json, "
                             "a Chrome trace (Perfetto, chrome://tracing)")
    parser.add_argument("--timeout", dest="timeout_s", type=SECONDS, default=d.timeout_s,
                        help="seconds a rank waits for its peers before giving up")
    parser.add_argument("--output-dir", default=d.output_dir)
    parser.add_argument("--tracker", default=d.tracker, choices=["none", "wandb", "tensorboard"])
    parser.add_argument("--project", default=d.project, help="W&B's project (default: $WANDB_PROJECT, else "
                                                                 "alexnet-mp); W&B's WANDB_DIR, WANDB_ENTITY, "
                                                                 "WANDB_RUN_GROUP and WANDB_TAGS are honoured too")
    parser.add_argument("--group", default=d.group, help="experiment name: runs compared together (default: "
                                                             "$WANDB_RUN_GROUP, else the arch and global batch)")
    parser.add_argument("--run-name", default=d.run_name)


def add_layout_options(parser: argparse.ArgumentParser, defaults: bool = False) -> None:
    """A flag for each layout's own option, from the registry: not given (None) unless set, or with `defaults`,
    the value a plan assumes."""
    for option, takers in all_options().values():
        default = option.planned_value() if defaults else None
        parser.add_argument(option.flag, dest=option.name, type=option.parse, choices=option.choices or None,
                            default=default, help=f"{' and '.join(takers)} only: {option.help} "
                                              f"(default {option.planned_value() if defaults else option.default})")


def train_config(args: argparse.Namespace) -> TrainConfig:
    fields = TrainConfig.__dataclass_fields__
    given = {key: value for key, value in vars(args).items() if key in fields}
    options = {name: getattr(args, name) for name in all_options() if getattr(args, name, None) is not None}
    return TrainConfig(**{**given, "options": options,
                          "mixed_precision": args.mixed_precision or launcher_mixed_precision()})


def launcher_mixed_precision() -> str:
    """What `accelerate launch --mixed_precision` (or its config file) asked for, which the Accelerator,
    given --mixed-precision's value, would override; "no" (float32) where no launcher says."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", TrainConfig.mixed_precision)
    if asked not in MIXED_PRECISIONS:
        raise UsageError(f"the launcher asks for mixed precision {asked!r}: this project runs one of "
                         f"{', '.join(MIXED_PRECISIONS)}; launch with one of them, or give --mixed-precision")
    return asked
