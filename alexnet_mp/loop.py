"""The training loop: step, evaluation, checkpoints, logging. It knows nothing of layouts: it asks
the strategy for logits, loss, parameters and which rows of each global batch to load."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import accelerate
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from alexnet_mp import checkpoint
from alexnet_mp.config import TrainConfig
from alexnet_mp.data import DataSpec, GlobalBatches, build_datasets, rank_batches
from alexnet_mp.errors import Diverged, UsageError
from alexnet_mp.step import LossScale, make_optimizer, train_step
from alexnet_mp.strategies import Setup, Strategy, create
from alexnet_mp.timing import StepClock, peak_memory_mb
from alexnet_mp.tracking import Tracker
from alexnet_mp.world import current


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The paper divides the learning rate by 10 when the validation error stops improving (stepped
    after each evaluation); the alternative divides it every --lr-step-epochs epochs."""
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epochs, gamma=0.1)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.1,
                                                      patience=config.plateau_patience)


@dataclass
class Evaluation:
    loss: float
    top1_error: float
    top5_error: float


@torch.no_grad()
def evaluate(strategy: Strategy, dataset: Dataset, batch_size: int, workers: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> Evaluation:
    """Validation loss and top-1/top-5 error over every image of `dataset`, each scored once; with ten
    crops per image (samples of shape [10, 3, H, W]) the ten softmaxes are averaged."""
    strategy.train(False)
    batches = validation_batches(len(dataset), batch_size)
    label_rows = strategy.label_rows(batch_size)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right, samples
    for step, images, labels in rank_batches(dataset, batches, strategy.image_rows(batch_size), label_rows, 0,
                                             batches.steps_per_epoch, workers, device):
        crops = images.shape[1] if images.dim() == 5 else 1
        with autocast():
            logits = strategy.forward(images.flatten(0, 1) if crops > 1 else images, step, batch_size * crops)
        if logits.numel():
            scored = batches.scored(step, label_rows).to(logits.device)
            sums += batch_sums(average_crops(logits.float(), crops), labels.to(logits.device), scored)
    strategy.train(True)
    loss, top1, top5, count = strategy.sum_over_replicas(sums).tolist()
    count = max(count, 1.0)
    return Evaluation(loss / count, 1 - top1 / count, 1 - top5 / count)


def validation_batches(images: int, batch_size: int) -> GlobalBatches:
    """The validation set in order, in global batches of the training's size (every layout can run them),
    the last filled up with the set's first images, which are not scored again."""
    return GlobalBatches(images, batch_size, seed=0, shuffle=False, fill_last=True)


def average_crops(logits: Tensor, crops: int) -> Tensor:
    """Log of the mean softmax over each image's crops (rows are image-major)."""
    if crops == 1:
        return logits.log_softmax(-1)
    return logits.softmax(-1).view(-1, crops, logits.shape[-1]).mean(1).log()


def batch_sums(log_probabilities: Tensor, labels: Tensor, scored: Tensor) -> Tensor:
    """Over the `scored` rows: summed negative log-likelihood, top-1 and top-5 correct counts, sample count."""
    top = log_probabilities.topk(min(5, log_probabilities.shape[-1]), -1).indices
    hit = (top == labels.unsqueeze(-1)) & scored.unsqueeze(-1)
    # where, not a boolean index: no wait for the GPU, and a fill row's -inf (a ten-crop mean's log) drops out
    nll = -torch.where(scored, log_probabilities.gather(-1, labels.unsqueeze(-1)).squeeze(-1), 0.0).sum()
    return torch.stack([nll.double(), hit[:, 0].sum().double(), hit.any(-1).sum().double(), scored.sum().double()])


class StopRequest:
    """SIGTERM or Ctrl-C: finish the step in hand, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True


def agreed_flags(stop_requested: bool, loss: Tensor) -> Tensor:
    """[a stop was requested, the loss is not finite], each any rank's (one tiny all-reduce per step) so
    that all ranks stop together. Made on the loss's device without a copy from the host, which on a GPU
    would wait for the step to finish: the host reads them once it has queued the next batch's work."""
    flags = torch.stack([torch.full((), float(stop_requested), device=loss.device),
                         loss.isfinite().logical_not().float()])
    if current().size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


Batch = tuple[int, Tensor, Tensor]  # step, this rank's images, this rank's labels


def next_batch(batches: Iterator[Batch]) -> tuple[Batch | None, float]:
    """The next of `batches` (None after the last), and the seconds the host spent getting it."""
    started = time.perf_counter()
    batch = next(batches, None)
    return batch, time.perf_counter() - started


def per_rank(values: list[float], device: torch.device) -> list[list[float]]:
    """Each of `values` from every rank, in one all-gather (for the main process to log)."""
    if current().size == 1:
        return [[value] for value in values]
    # float64: byte counts of 10^8 and more are exact in it, not in float32
    gathered = [torch.zeros(len(values), dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, torch.tensor(values, dtype=torch.float64, device=device))
    return torch.stack(gathered).T.tolist()


def train(config: TrainConfig, accelerator: Accelerator) -> None:
    train_set, val_set = build_datasets(DataSpec(config.data, config.dataset, config.num_classes,
                                                 config.synthetic_size, config.ten_crop, config.decode_on),
                                        config.seed)
    batches = GlobalBatches(len(train_set), config.batch_size, config.seed)
    if batches.steps_per_epoch < 1:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training images")
    device = accelerator.device
    setup = Setup(config.arch, config.num_classes or train_set.num_classes, config.seed, device,
                  exchange=config.exchange, init=config.init, speed=config.speed,
                  timeout=timedelta(seconds=config.timeout_s))
    strategy = create(config.mode, setup, accelerator.num_processes)
    strategy.check_batch(config.batch_size)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), config)
    scheduler = make_scheduler(optimizer, config)
    scale = LossScale() if config.mixed_precision == "fp16" else None
    autocast = mixed_precision_autocast(accelerator, config.mixed_precision)
    total = config.steps or config.epochs * batches.steps_per_epoch
    checkpoints = config.checkpoints
    found = checkpoint.resume_point(config.resume, checkpoints)
    if found:
        checkpoint.load(found, strategy, optimizer)
        scheduler.load_state_dict(found.meta["scheduler"])
        if scale and found.meta.get("loss_scale"):
            scale.load_state_dict(found.meta["loss_scale"])
    start = found.step if found else 0
    if start >= total:  # before the tracker, which would rewrite the run's record
        accelerator.print(f"the run is already at step {start} of {total}: nothing to train; raise --steps or "
                          "--epochs to go on")
        return
    stream_changes = config.sample_stream_changes(found.meta["config"]) if found else []
    if stream_changes and accelerator.is_main_process:
        print(f"warning: resumed with {', '.join(stream_changes)}: from step {start} on, the batches and dropout "
              "masks are not those the checkpoint's run would have drawn", file=sys.stderr)
    tracker = Tracker(accelerator, run_description(config, strategy, accelerator), config.output, config.tracker,
                      config.project, config.group, config.run_name, config.mode, resumed_at=start)
    stop = StopRequest()

    def save(next_step: int) -> None:
        meta = {"step": next_step, "epoch": next_step // batches.steps_per_epoch,
                "scheduler": scheduler.state_dict(), "config": config.to_dict(),
                "loss_scale": scale.state_dict() if scale else None}
        checkpoint.save(checkpoints, strategy, optimizer, meta, config.keep_checkpoints)

    progress = tqdm(total=total, initial=start, disable=not (accelerator.is_main_process and sys.stderr.isatty()),
                    unit="step", dynamic_ncols=True)
    steps = rank_batches(train_set, batches, strategy.image_rows(config.batch_size),
                         strategy.label_rows(config.batch_size), start, total, config.workers, device)
    clock = StepClock(device)
    batch, data_wait_s = next_batch(steps)
    while batch is not None:
        step, images, labels = batch
        clock.start()
        strategy.ledger.reset()
        with autocast():
            loss = train_step(strategy, optimizer, images, labels, step, config.batch_size, scale)
        flags = agreed_flags(stop.requested, loss)
        clock.end()
        # Nothing above waits for a GPU (fp16's overflow check aside): the host decodes and queues the
        # next batch while the device runs this step, and only then waits for the step's flags, time, loss.
        upcoming, upcoming_wait_s = next_batch(steps)
        stopping, diverged = (bool(flag) for flag in flags.tolist())
        if diverged:
            raise Diverged(f"the loss is not finite at step {step}; the last good checkpoint in "
                                     f"{checkpoints} is intact (try a lower --lr)")
        elapsed = clock.seconds()
        if step % config.log_every == 0 or step == total - 1:
            global_loss = float(strategy.global_loss(loss))
            memory, sent = per_rank([peak_memory_mb(device), strategy.ledger.total_bytes()], device)
            tracker.log({"loss": global_loss, "lr": optimizer.param_groups[0]["lr"], "epoch": batches.epoch(step),
                         "step_time_s": elapsed, "data_wait_s": data_wait_s,
                         "images_per_s": config.batch_size / elapsed, "comm_bytes": sent,
                         "comm_wait_s": strategy.ledger.wait_s,
                         **{f"comm_wait_s/{link}": seconds for link, seconds in strategy.ledger.waits.items()},
                         "peak_memory_mb": memory, **({"loss_scale": scale.value} if scale else {})}, step)
            progress.set_postfix(loss=f"{global_loss:.4f}", img_s=f"{config.batch_size / elapsed:.1f}")
        progress.update()
        next_step = step + 1
        epoch_end = next_step % batches.steps_per_epoch == 0
        if epoch_end or (config.eval_every and next_step % config.eval_every == 0):
            result = evaluate(strategy, val_set, config.batch_size, config.workers, device, autocast)
            tracker.log({"val_loss": result.loss, "val_top1_error": result.top1_error,
                         "val_top5_error": result.top5_error}, step)
            if config.lr_schedule == "plateau":
                scheduler.step(result.top1_error)
        if epoch_end and config.lr_schedule == "step":
            scheduler.step()
        checkpoint_due = bool(config.checkpoint_every) and next_step % config.checkpoint_every == 0
        # the run's last step too: --steps may end it mid-epoch, and its training would be lost
        if epoch_end or stopping or next_step == total or checkpoint_due:
            save(next_step)
        if stopping:
            accelerator.print(f"stopped by a signal after step {step}; checkpoint saved, resume with --resume latest")
            break
        batch, data_wait_s = upcoming, upcoming_wait_s
    progress.close()
    tracker.finish()


def mixed_precision_autocast(accelerator: Accelerator, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    """accelerate's autocast; on a CPU, where accelerate leaves fp16 off, torch's own fp16 autocast."""
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        return lambda: torch.autocast("cpu", dtype=torch.float16)
    return accelerator.autocast


def run_description(config: TrainConfig, strategy: Strategy, accelerator: Accelerator) -> dict:
    """Everything that defines the run, for config.json and the trackers."""
    rows = strategy.image_rows(config.batch_size)
    return {**config.to_dict(), "num_classes": strategy.setup.num_classes, "world_size": accelerator.num_processes,
            "per_rank_batch": rows.stop - rows.start, "device": str(accelerator.device),
            "torch": torch.__version__, "accelerate": accelerate.__version__}
