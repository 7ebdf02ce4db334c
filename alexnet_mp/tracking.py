"""A run's folder and record: one live run per folder (OUTPUT/run.lock), OUTPUT/config.json and
OUTPUT/metrics.jsonl always (so runs can be compared offline), and accelerate's trackers (wandb,
tensorboard) when asked; main process only."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError, WriteFailed
from alexnet_mp.flag_types import COUNT, takes
from alexnet_mp.strategies import layout_label
from alexnet_mp.world import current

if TYPE_CHECKING:  # commands that only check arguments need not import accelerate
    from accelerate import Accelerator

TRACKER_INSTALLS = {"wandb": "pip install wandb", "tensorboard": "pip install 'alexnet-mp[tensorboard]'"}
DEFAULT_PROJECT = "alexnet-mp"
WANDB_RUN_ID = "wandb-run-id"  # in OUTPUT: the W&B run that a resume of this run continues


def require_tracker(tracker: str) -> None:
    """Refuses, in one line, a tracker whose package is missing: accelerate would only warn, then log
    nothing to it."""
    if tracker in TRACKER_INSTALLS and importlib.util.find_spec(tracker) is None:
        raise UsageError(f"--tracker {tracker} needs the {tracker} package: {TRACKER_INSTALLS[tracker]}, "
                         "or use --tracker none")


def run_label(description: dict[str, Any]) -> str:
    """A run's name in comparisons, and in W&B unless --run-name gives one: its layout and its rank count."""
    return f"{layout_label(description)} x{description['world_size']}"


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` becomes a WriteFailed that says what to do (the command line prints
    it in one line), not a traceback and, on the other ranks, a lost peer."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(f"could not write {path} ({error.strerror or error}): make room, then run again; "
                               "the checkpoints written so far are intact (--resume latest goes on from the newest)"
                               ) from None


RUN_LOCK = "run.lock"  # in OUTPUT: held by the run writing there (`hold_output`)
CONFIG, METRICS = "config.json", "metrics.jsonl"  # in OUTPUT: the run's record
RUN_RECORD = (CONFIG, METRICS)


@contextmanager
def hold_output(folder: Path) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (which `check_run` found writable) while the run writing there
    lives; the main process takes it. A second run into the folder is refused in one line: the same command
    started twice, say, or a requeued job whose first attempt is still saving. The two would interleave
    their metrics, and delete each other's half-written checkpoints. It is an flock, which the kernel drops
    with its process however that ends, so a killed run leaves no stale lock. Where the file system has no
    locks, the run goes on with a warning. A run refused before it wrote anything leaves no folder behind, and
    one that ends, refused or not, no lock file. A lock file that is a symbolic link is refused, not followed."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK
    with _open_lock(path) as lock:
        _lock(lock, folder)
        try:
            yield
        finally:  # only while holding the lock: a refused run must not remove a live one's
            path.unlink(missing_ok=True)
            if created and not any(folder.iterdir()):
                folder.rmdir()


def _open_lock(path: Path) -> TextIO:
    """The lock file, created if need be, never through a symbolic link (whose target it would overwrite)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise UsageError(f"{path} is a symbolic link, which a run never writes through: remove it, or choose "
                         "another --output-dir") from None
    return os.fdopen(descriptor, "r+")


def _lock(lock: TextIO, folder: Path) -> None:
    """Takes `lock` (the open RUN_LOCK of `folder`) and writes this process's pid and host into it. A lock taken
    on a file that its holder removed as it ended (this process opened it just before) is taken again, anew."""
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
    try:
        current = os.stat(folder / RUN_LOCK, follow_symlinks=False).st_ino
    except FileNotFoundError:
        current = None
    if current != os.fstat(lock.fileno()).st_ino:
        raise UsageError(f"{folder} was in use by a run that has just ended: start again")
    with writing(folder / RUN_LOCK):
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()


class CorruptRecord(ValueError):
    """A line of metrics.jsonl that is not a step's row (a JSON object with its step), other than a last line a
    crash cut short."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A last line with no newline after it that is not JSON is the write of
    a run killed mid-line, left out (a resume logs that step again); any other line that is not JSON raises
    CorruptRecord, naming it, as does a line that is not an object with a step count."""
    lines = path.read_text().split("\n")  # the last is "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise CorruptRecord(f"{path.name} line {number} is not JSON ({error.msg})") from None
            continue
        if not (isinstance(row, dict) and takes(COUNT, row.get("step"))):
            raise CorruptRecord(f"{path.name} line {number} is not a step's row (an object with its step)")
        rows.append(row)
    return rows


class Tracker:
    """A run's record, on the main process: config.json, a row of metrics.jsonl per logged step and evaluation,
    accelerate's trackers when asked (W&B's per-rank figures as a scalar per rank and their max), and, when the
    output is not a terminal (a cluster job's log), a line per logged step, per evaluation and at the end."""

    def __init__(self, accelerator: Accelerator, description: dict[str, Any], config: TrainConfig, total: int,
                 resumed_at: int = 0) -> None:
        self.accelerator, self.active, self.config, self.total = accelerator, current().is_main, config, total
        self.metrics_path = config.output / METRICS
        self.uses_trackers = config.tracker != "none"
        self.lines = not sys.stderr.isatty()  # on a terminal, the progress bar says it
        self.began = self.wall_before = 0.0
        if not self.active:
            return
        config.output.mkdir(parents=True, exist_ok=True)
        kept = self._keep_steps_before(resumed_at)
        # a resumed run's clock goes on from its checkpoint's (records from before wall_s have none)
        self.wall_before = max((row.get("wall_s", 0.0) for row in kept), default=0.0)
        with writing(config.output / CONFIG):
            (config.output / CONFIG).write_text(json.dumps(description, indent=2, sort_keys=True, default=str)
                                                       + "\n")
        if self.uses_trackers:
            settings = {}
            if config.tracker == "wandb":
                settings["wandb"] = {
                    **wandb_settings(config, description),
                    **wandb_identity(config.output, resumed_at > 0),
                }
            _init_trackers(accelerator, config.tracker, wandb_project(config), description, settings)
        self.began = time.perf_counter()  # the loop's first step starts now

    def _keep_steps_before(self, step: int) -> list[dict[str, Any]]:
        """A resumed run continues the file where its checkpoint was taken (later lines, logged after
        it before a crash, are logged again); a new run starts a new file. Returns the rows kept."""
        if not self.metrics_path.exists():
            return []
        try:
            rows = read_metrics(self.metrics_path) if step else []
        except CorruptRecord as error:
            raise UsageError(f"{self.metrics_path.parent}: {error}; mend or delete that line, then resume") from None
        kept = [row for row in rows if row["step"] < step]
        temporary = self.metrics_path.with_suffix(".jsonl.tmp")
        with writing(temporary):
            temporary.write_text("".join(json.dumps(row) + "\n" for row in kept))
            temporary.replace(self.metrics_path)
        return kept

    @property
    def wall_s(self) -> float:
        """The seconds the run has trained so far (evaluations and checkpoints included, the time lost to a
        crash not)."""
        return self.wall_before + time.perf_counter() - self.began

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Writes a row to metrics.jsonl, stamped with `wall_s`, passes `metrics` to the trackers, and says it
        in a line where the output is not a terminal."""
        if not self.active:
            return
        with writing(self.metrics_path), self.metrics_path.open("a") as record:
            record.write(json.dumps({"step": step, "wall_s": self.wall_s, **metrics}) + "\n")
        if self.uses_trackers:
            self.accelerator.log(per_rank_scalars(metrics), step=step)
        if self.lines:
            print(step_line(metrics, step, self.total) if "loss" in metrics else evaluation_line(metrics, step),
                  flush=True)

    def finish(self, steps: int, newest_checkpoint: Path | None) -> None:
        """The closing line, on the main process: what was trained, and where its record and checkpoint are."""
        if not self.active:
            return
        for tracker in self.accelerator.trackers:  # the process group stays until every rank leaves it together
            tracker.finish()
        if newest_checkpoint:
            kept = f"newest checkpoint {newest_checkpoint} ({checkpoint_size(newest_checkpoint)})"
        else:
            kept = "no checkpoint kept (--no-checkpoints)" if not self.config.save_checkpoints else "no checkpoint yet"
        print(f"trained {steps} steps in {self.wall_s:.1f} s (to step {self.total}); record in {self.metrics_path}; "
              f"{kept}", flush=True)


def step_line(figures: dict[str, Any], step: int, total: int) -> str:
    """A logged step in one line, as nanoGPT's and torchvision's reference scripts print them."""
    step_ms, comm_ms = 1000 * figures["step_time_s"], 1000 * figures["comm_wait_s"]
    return (f"step {step + 1}/{total} | loss {figures['loss']:.4f} | lr {figures['lr']:.3g} | "
            f"{figures['images_per_s']:.1f} images/s | step {step_ms:.0f} ms (compute {step_ms - comm_ms:.0f} + comm "
            f"wait {comm_ms:.0f}) + data wait {1000 * figures['data_wait_s']:.0f} ms | peak "
            f"{max(figures['peak_memory_mb']):.0f} MiB")


def evaluation_line(figures: dict[str, Any], step: int) -> str:
    return (f"evaluation after step {step + 1} | val loss {figures['val_loss']:.4f} | top-1 error "
            f"{figures['val_top1_error']:.4f} | top-5 error {figures['val_top5_error']:.4f}")


def checkpoint_size(folder: Path) -> str:
    return f"{sum(path.stat().st_size for path in folder.iterdir()) / 2**20:.0f} MiB"


def per_rank_scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """A figure per rank (a list) as a scalar per rank, `name/rank0` ..., and their max under its own name: W&B
    charts scalars, not lists."""
    scalars: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, list):
            scalars.update({f"{name}/rank{rank}": each for rank, each in enumerate(value)})
            scalars[name] = max(value)
        else:
            scalars[name] = value
    return scalars


def wandb_project(config: TrainConfig) -> str:
    """--project, else W&B's own WANDB_PROJECT, else alexnet-mp."""
    return config.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def wandb_settings(config: TrainConfig, description: dict[str, Any]) -> dict[str, Any]:
    """wandb.init's arguments: each flag, else W&B's own environment variable (WANDB_DIR, WANDB_RUN_GROUP,
    WANDB_TAGS; WANDB_ENTITY wandb reads itself), else a default that W&B's group-by and filters can use: the
    group is the architecture and the global batch (runs of one comparison), and the tags say the layout, its
    ranks, the architecture and the precision."""
    tags = [tag for tag in os.environ.get("WANDB_TAGS", "").split(",") if tag]
    tags += [description["mode"], f"x{description['world_size']}", config.arch, config.mixed_precision]
    return {"group": config.group or os.environ.get("WANDB_RUN_GROUP") or f"{config.arch}-b{config.batch_size}",
            "job_type": config.mode, "name": config.run_name or run_label(description),
            "dir": os.environ.get("WANDB_DIR") or str(config.output), "tags": list(dict.fromkeys(tags))}


def _init_trackers(accelerator: Accelerator, tracker: str, project: str, config: dict[str, Any],
                   init: dict[str, dict[str, Any]]) -> None:
    """accelerate's trackers; wandb's refusals (no API key, no connection to its server) in one line."""
    try:
        accelerator.init_trackers(project, config=config, init_kwargs=init)
    except Exception as error:
        if tracker != "wandb" or not type(error).__module__.startswith("wandb"):
            raise
        refusal = str(error).strip().rstrip(".")
        raise UsageError(f"--tracker wandb: {refusal}; or set WANDB_MODE=offline to keep the run's record on disk "
                         "(`wandb sync` uploads it later), or use --tracker none") from None


def wandb_identity(output: Path, resumed: bool) -> dict[str, str]:
    """wandb.init's id (and resume) for the run in `output`: a resumed run continues its W&B run, whose
    curves would otherwise be split over two runs. Offline, each part is a folder with the run's id,
    and `wandb sync` uploads them into one run. Steps logged after the checkpoint before a crash are
    logged again, which W&B ignores: they are the same (seed, step), so the same values, timings aside."""
    path = output / WANDB_RUN_ID
    if resumed and path.is_file():
        return {"id": path.read_text().strip(), "resume": "allow"}
    run_id = uuid.uuid4().hex[:8]
    with writing(path):
        path.write_text(run_id + "\n")
    return {"id": run_id}


def publish_comparison(tables: dict[str, tuple[list[str], list[list[str]]]], plots: list[Path], project: str,
                       group: str, directory: Path) -> None:
    """The comparison's tables (by name: header, rows) as wandb Tables, and its plots (the step's time split,
    bytes per step, the timeline: figures a W&B panel cannot draw from the runs' curves), in a summary run of the
    experiment's group."""
    import wandb

    run = wandb.init(project=project, group=group, job_type="summary", name=f"{group}-summary", dir=str(directory))
    run.log({**{name: wandb.Table(columns=header, data=rows) for name, (header, rows) in tables.items()},
             **{f"comparison/{plot.stem}": wandb.Image(str(plot)) for plot in plots}})
    run.finish()
