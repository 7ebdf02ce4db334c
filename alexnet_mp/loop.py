"""The training loop: step, evaluation, checkpoints, logging. It knows nothing of layouts: it asks
the layout for logits, loss, parameters and which rows of each global batch to load."""

from __future__ import annotations

import math
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

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
from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import COUNT, is_number, takes
from alexnet_mp.step import LossScale, make_optimizer, train_step
from alexnet_mp.strategies import Layout
from alexnet_mp.strategies import build as build_layout
from alexnet_mp.timing import StepClock, memory_in_use_mb, peak_memory_mb
from alexnet_mp.trace import DATA, TRACED, WARM_UP, Tracer, write_trace
from alexnet_mp.tracking import Tracker
from alexnet_mp.world import current


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The paper divides the learning rate by 10 when the validation error stops improving (stepped
    after each evaluation); the alternative divides it every --lr-step-epochs epochs. Each group keeps the
    rate it starts at as `initial_lr` (torch's name), which a checkpoint's `lowered_by` is taken against."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
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
def evaluate(layout: Layout, dataset: Dataset, batch_size: int, workers: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager] = nullcontext) -> Evaluation:
    """Validation loss and top-1/top-5 error over every image of `dataset`, each scored once; with ten
    crops per image (samples of shape [10, 3, H, W]) the ten softmaxes are averaged."""
    layout.train(False)
    batches = validation_batches(len(dataset), batch_size)
    label_rows = layout.label_rows(batch_size)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right, samples
    for step, images, labels in rank_batches(dataset, batches, layout.image_rows(batch_size), label_rows, 0,
                                             batches.steps_per_epoch, workers, device):
        crops = images.shape[1] if images.dim() == 5 else 1
        with autocast():
            logits = layout.forward(images.flatten(0, 1) if crops > 1 else images, step, batch_size * crops)
        if logits.numel():
            scored = batches.scored(step, label_rows).to(logits.device)
            sums += batch_sums(average_crops(logits.float(), crops), labels.to(logits.device), scored)
    layout.train(True)
    loss, top1, top5, count = layout.sum_over_replicas(sums).tolist()
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


def agreed_flags(stop_requested: bool, loss: Tensor, unreadable_images: int) -> Tensor:
    """[a stop was requested, the loss is not finite, unreadable images met], each the most of any rank's (one
    tiny all-reduce per step) so that all ranks stop together. Made on the loss's device without a copy from
    the host, which on a GPU would wait for the step to finish: the host reads them once it has queued the
    next batch's work."""
    flags = torch.stack([torch.full((), float(stop_requested), device=loss.device),
                         loss.isfinite().logical_not().float(),
                         torch.full((), float(unreadable_images), device=loss.device)])
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


@dataclass
class Run:
    """A training run as the loop holds it: its data, its layout on this rank, the optimizer and its schedule,
    and where it starts (a resumed run: its checkpoint's next step)."""

    config: TrainConfig  # num_classes resolved from the data
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    batches: GlobalBatches
    layout: Layout
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
    scale: LossScale | None
    autocast: Callable[[], AbstractContextManager]
    resumed_from: checkpoint.Checkpoint | None
    before_net_mb: float  # the memory in use before the net was built

    @property
    def start(self) -> int:
        return self.resumed_from.step if self.resumed_from else 0

    @property
    def total(self) -> int:
        return self.config.steps or self.config.epochs * self.batches.steps_per_epoch

    @property
    def bad_image_limit(self) -> int:
        limit = self.config.max_bad_images
        return math.ceil(len(self.train_set) / 1000) if limit is None else limit


def build(config: TrainConfig, accelerator: Accelerator) -> Run:
    """Data, then the whole net laid out on this rank by the run's layout, then the optimizer; loaded from the
    checkpoint the run resumes from, if any."""
    train_set, val_set = build_datasets(DataSpec(config.data, config.dataset, config.num_classes,
                                                 config.synthetic_size, config.ten_crop, config.decode_on),
                                        config.seed)
    batches = GlobalBatches(len(train_set), config.batch_size, config.seed)
    if batches.steps_per_epoch < 1:
        raise UsageError(f"--batch-size {config.batch_size} is larger than the {len(train_set)} training images")
    config = replace(config, num_classes=config.num_classes or train_set.num_classes)
    before_net_mb = memory_in_use_mb(accelerator.device)
    layout = build_layout(config, accelerator.device)
    layout.train()
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())
    run = Run(config, accelerator.device, train_set, val_set, batches, layout, optimizer,
              make_scheduler(optimizer, config), LossScale() if config.mixed_precision == "fp16" else None,
              mixed_precision_autocast(accelerator, config.mixed_precision),
              checkpoint.resume_point(config.resume, config.checkpoints), before_net_mb)
    if run.resumed_from:
        resume(run, run.resumed_from)
    return run


def resume(run: Run, found: checkpoint.Checkpoint) -> None:
    saved_config = checkpoint.training_config(found)
    if saved_config.get("lr_schedule", run.config.lr_schedule) != run.config.lr_schedule:
        raise UsageError(f"{found.path} was written under --lr-schedule {saved_config['lr_schedule']}, not "
                         f"{run.config.lr_schedule}: pass --lr-schedule {saved_config['lr_schedule']}")
    checkpoint.load(found, run.layout, run.optimizer)
    restore_schedule(run, found)
    if run.scale and found.meta.get("loss_scale"):
        if not LossScale.is_state(found.meta["loss_scale"]):
            raise checkpoint.corrupt(found, "its loss_scale is not a scale and a count of clean steps")
        run.scale.load_state_dict(found.meta["loss_scale"])
    if current().is_main:
        print(f"resumed from {found.path} (step {found.step})", file=sys.stderr, flush=True)
        changes = run.config.sample_stream_changes(saved_config)
        if changes:
            print(f"warning: resumed with {', '.join(changes)}: from step {run.start} on, the batches and dropout "
                  "masks are not those the checkpoint's run would have drawn", file=sys.stderr)


# A schedule's progress in its state_dict, counts but for the best error so far; the rest are its settings,
# which the resumed run's flags give, as they give its --lr.
SCHEDULE_PROGRESS = ("last_epoch", "_step_count", "num_bad_epochs", "cooldown_counter", "best")


def restore_schedule(run: Run, found: checkpoint.Checkpoint) -> None:
    """The schedule's progress as the checkpoint saved it, and every rate lowered as far as it had lowered
    them (`lowered_by`: the same share of each group's initial rate, whatever the layout's groups)."""
    state, saved = run.scheduler.state_dict(), found.meta["scheduler"]
    progress = {key: saved.get(key) for key in SCHEDULE_PROGRESS if key in state}
    wrong = [key for key, value in progress.items() if not (is_number(value) if key == "best" else takes(COUNT, value))]
    if wrong:
        raise checkpoint.corrupt(found, f"its scheduler's {', '.join(wrong)}")
    share = found.meta.get("lowered_by")
    if share is None:
        share = 1.0
        if current().is_main:
            print(f"warning: {found.path} does not record how far its schedule had lowered the learning rate: "
                  "resuming at the run's own", file=sys.stderr)
    if not (is_number(share) and 0 < share <= 1):
        raise checkpoint.corrupt(found, f"lowered_by {share!r} is not a share of the learning rate")
    run.scheduler.load_state_dict({**state, **progress})
    for group in run.optimizer.param_groups:
        group["lr"] = group["initial_lr"] * share


def lowered_by(optimizer: torch.optim.Optimizer) -> float:
    """The share of its initial rate each group's learning rate now is: the schedules lower all alike."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["initial_lr"] if group["initial_lr"] else 1.0  # --lr 0 stays 0


def train(config: TrainConfig, accelerator: Accelerator) -> None:
    run = build(config, accelerator)
    if run.start >= run.total:  # before the tracker, which would rewrite the run's record
        accelerator.print(f"the run is already at step {run.start} of {run.total}: nothing to train; raise --steps "
                          "or --epochs to go on")
        return
    config, layout = run.config, run.layout
    tracker = Tracker(accelerator, run_description(run, accelerator), config, run.total, resumed_at=run.start)
    stop, stuck = StopRequest(), StuckLoss(config.num_classes)
    progress = tqdm(total=run.total, initial=run.start, disable=not (current().is_main and sys.stderr.isatty()),
                    unit="step", dynamic_ncols=True)
    steps = rank_batches(run.train_set, run.batches, layout.image_rows(config.batch_size),
                         layout.label_rows(config.batch_size), run.start, run.total, config.workers, run.device)
    clock = StepClock(run.device)
    tracer = Tracer(current().rank) if config.trace else None
    if tracer:
        tracer.watch(layout, run.optimizer)
    batch, data_wait_s = next_batch(steps)
    while batch is not None:
        step, images, labels = batch
        if tracer:
            tracer.tracing(step, run.start)
        clock.start()
        loss, flags = run_step(run, images, labels, step, stop)
        clock.end()
        # Nothing above waits for a GPU (fp16's overflow check aside): the host decodes and queues the
        # next batch while the device runs this step, and only then waits for the step's flags, time, loss.
        upcoming, upcoming_wait_s = next_batch(steps)
        if tracer:  # the next step's batch, fetched while this step's work is queued
            fetched = time.time()
            tracer.add_host("data wait (next batch)", DATA, fetched - upcoming_wait_s, fetched)
        stop_flag, diverged, unreadable_flag = flags.tolist()
        stopping, unreadable = bool(stop_flag), int(unreadable_flag)
        if diverged:
            raise checkpoint.diverged(config.checkpoints, f"the loss is not finite at step {step}")
        check_unreadable(run, unreadable)
        if step % config.log_every == 0 or step == run.total - 1:
            figures = log_step(run, tracker, step, loss, clock.seconds(), data_wait_s)
            progress.set_postfix(loss=f"{figures['loss']:.4f}", img_s=f"{figures['images_per_s']:.1f}")
            stuck.add(figures["loss"])
        progress.update()
        if (step + 1) % run.batches.steps_per_epoch == 0:
            stuck.epoch_ended(run.batches.epoch(step))
            unreadable = unreadable_on_any_rank(run)
            check_unreadable(run, unreadable)
            if unreadable:
                accelerator.print(f"epoch {run.batches.epoch(step)}: {unreadable} unreadable training "
                                  "images skipped so far, each replaced by the next image of its class")
        after_step(run, tracker, step + 1, stopping, unreadable)
        if stopping:
            kept = "checkpoint saved, resume with --resume latest" if config.save_checkpoints else \
                "no checkpoint kept (--no-checkpoints)"
            accelerator.print(f"stopped by a signal after step {step}; {kept}")
            break
        batch, data_wait_s = upcoming, upcoming_wait_s
    progress.close()
    if tracer:
        written = write_trace(tracer, config.output, current().is_main)
        if written:
            accelerator.print(f"timeline of steps {run.start + WARM_UP} to {run.start + WARM_UP + TRACED - 1} on every "
                              f"rank: {written} (Perfetto, chrome://tracing)")
    newest = checkpoint.complete_checkpoints(config.checkpoints)
    tracker.finish(step + 1 - run.start, newest[-1] if newest else None)


def check_unreadable(run: Run, unreadable: int) -> None:
    if unreadable > run.bad_image_limit:
        raise UsageError(f"{unreadable} training images are unreadable, more than --max-bad-images "
                         f"{run.bad_image_limit}: replace or remove the files the warnings name, or raise it")


def unreadable_on_any_rank(run: Run) -> int:
    """The training images any rank found unreadable. Ranks read the same images (model parallel) or different
    ones (data parallel), so their flags are united, not added: one all-reduce of a byte per image, at an
    epoch's end. A step's flags carry only the most any one rank met, a lower bound."""
    flags = run.train_set.unreadable.to(run.device, torch.uint8)
    if current().size > 1 and flags.numel():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags.sum())


def run_step(run: Run, images: Tensor, labels: Tensor, step: int, stop: StopRequest) -> tuple[Tensor, Tensor]:
    """One training step, queued: this rank's loss, and the flags every rank agrees on (`agreed_flags`). A stop
    is read once the step is queued, so one that arrives during it ends the run after it, not after the next."""
    run.layout.ledger.reset()
    with run.autocast(), warmed_up(run.optimizer, warmup_factor(step, run.config.warmup_steps)):
        loss = train_step(run.layout, run.optimizer, images, labels, step, run.config.batch_size, run.scale)
    return loss, agreed_flags(stop.requested, loss, int(run.train_set.unreadable.sum()))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The learning rate's share at `step` under a linear warm-up over `warmup_steps` steps (Goyal et al.
    2017): (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


@contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """The optimizer's step at `factor` times each group's learning rate, which the schedule keeps as it is."""
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled, strict=True):
            group["lr"] = lr


class StuckLoss:
    """Warns once, in one line, when the training loss has stayed at chance, ln(classes) (the softmax spread
    evenly), for a whole epoch: a net that does not learn, most often a learning rate too high for its init
    (docs/reproduction.md)."""

    def __init__(self, num_classes: int) -> None:
        self.chance, self.losses, self.warned = math.log(num_classes), [], False

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def epoch_ended(self, epoch: int) -> None:
        stuck = bool(self.losses) and all(abs(loss - self.chance) <= 0.01 * self.chance for loss in self.losses)
        if stuck and not self.warned and current().is_main:
            print(f"warning: the training loss stayed at chance, ln(classes) = {self.chance:.3f}, for all of epoch "
                  f"{epoch}: the net is not learning; lower --lr, or raise it slowly with --warmup-steps",
                  file=sys.stderr, flush=True)
            self.warned = True
        self.losses = []


def log_step(run: Run, tracker: Tracker, step: int, loss: Tensor, step_time_s: float, data_wait_s: float,
             ) -> dict[str, Any]:
    """A training step's row of the record: the global batch's loss, speed, the time waited on each link, the
    bytes each rank sent, and each rank's peak memory, whole and less what was in use before the net was built
    (what training adds, which the cost model predicts). Returns it."""
    layout, batch = run.layout, run.config.batch_size
    peak = peak_memory_mb(run.device)
    memory, sent, training = per_rank([peak, layout.ledger.total_bytes(), peak - run.before_net_mb], run.device)
    lr = run.optimizer.param_groups[0]["lr"] * warmup_factor(step, run.config.warmup_steps)
    figures = {"loss": float(layout.global_loss(loss)), "lr": lr,
               "epoch": run.batches.epoch(step), "step_time_s": step_time_s, "data_wait_s": data_wait_s,
               "images_per_s": batch / step_time_s, "comm_bytes": sent, "comm_wait_s": layout.ledger.wait_s,
               **{f"comm_wait_s/{link}": seconds for link, seconds in layout.ledger.waits.items()},
               "peak_memory_mb": memory, "training_memory_mb": training,
               **({"loss_scale": run.scale.value} if run.scale else {})}
    tracker.log(figures, step)
    return figures


def after_step(run: Run, tracker: Tracker, next_step: int, stopping: bool, unreadable: int) -> None:
    """What falls due once a step is done: an evaluation (at an epoch's end, or every --eval-every steps) and the
    learning rate's schedule (the evaluation's row counts the unreadable images met so far), then a checkpoint
    (at an epoch's end, every --checkpoint-every steps, on a stop, and at the run's last step, since --steps may
    end it mid-epoch and its training would be lost)."""
    config = run.config
    epoch_end = next_step % run.batches.steps_per_epoch == 0
    if epoch_end or (config.eval_every and next_step % config.eval_every == 0):
        result = evaluate(run.layout, run.val_set, config.batch_size, config.workers, run.device, run.autocast)
        tracker.log({"val_loss": result.loss, "val_top1_error": result.top1_error,
                     "val_top5_error": result.top5_error, "unreadable_images": unreadable}, next_step - 1)
        if config.lr_schedule == "plateau":
            run.scheduler.step(result.top1_error)
    if epoch_end and config.lr_schedule == "step":
        run.scheduler.step()
    checkpoint_due = bool(config.checkpoint_every) and next_step % config.checkpoint_every == 0
    if config.save_checkpoints and (epoch_end or stopping or next_step == run.total or checkpoint_due):
        save(run, next_step)


def save(run: Run, next_step: int) -> None:
    meta = {"step": next_step, "epoch": next_step // run.batches.steps_per_epoch,
            "scheduler": run.scheduler.state_dict(), "lowered_by": lowered_by(run.optimizer),
            "config": run.config.to_dict(),
            "loss_scale": run.scale.state_dict() if run.scale else None}
    checkpoint.save(run.config.checkpoints, run.layout, run.optimizer, meta, run.config.keep_checkpoints)


def mixed_precision_autocast(accelerator: Accelerator, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    """accelerate's autocast; on a CPU, where accelerate leaves fp16 off, torch's own fp16 autocast."""
    if mixed_precision == "fp16" and accelerator.device.type == "cpu":
        return lambda: torch.autocast("cpu", dtype=torch.float16)
    return accelerator.autocast


def run_description(run: Run, accelerator: Accelerator) -> dict:
    """Every flag and what it resolved to where it runs, for config.json and the trackers."""
    import torchvision

    rows = run.layout.image_rows(run.config.batch_size)
    return {**run.config.to_dict(), "world_size": current().size, "per_rank_batch": rows.stop - rows.start,
            "device": str(accelerator.device), "scaled_lr": run.config.scaled_lr, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}
