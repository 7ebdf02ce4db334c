"""A run's folder and record: one live run per folder (OUTPUT/run.lock), OUTPUT/config.json and
OUTPUT/metrics.jsonl always (so runs can be compared offline), and accelerate's trackers (wandb,
tensorboard) when asked; main process only."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from alexnet_mp.config import layout_label
from alexnet_mp.errors import UsageError, WriteFailed
from alexnet_mp.world import current

if TYPE_CHECKING:  # commands that only check arguments need not import accelerate
    from accelerate import Accelerator

TRACKER_INSTALLS = {"wandb": "pip install wandb", "tensorboard": "pip install 'alexnet-mp[tensorboard]'"}
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


class CorruptRecord(ValueError):
    """A line of metrics.jsonl that is not JSON, other than a last line a crash cut short."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl. A last line with no newline after it that is not JSON is the write of
    a run killed mid-line, left out (a resume logs that step again); any other line that is not JSON raises
    CorruptRecord, naming it."""
    lines = path.read_text().split("\n")  # the last is "" when the file ends with a newline
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise CorruptRecord(f"{path.name} line {number} is not JSON ({error.msg})") from None
    return rows


class Tracker:
    def __init__(self, accelerator: Accelerator, config: dict[str, Any], output: Path, tracker: str,
                 project: str, group: str | None, run_name: str | None, job_type: str, resumed_at: int = 0) -> None:
        self.accelerator, self.active = accelerator, current().is_main
        self.metrics_path = output / "metrics.jsonl"
        self.uses_trackers = tracker != "none"
        self.began = self.wall_before = 0.0
        if not self.active:
            return
        output.mkdir(parents=True, exist_ok=True)
        kept = self._keep_steps_before(resumed_at)
        # a resumed run's clock goes on from its checkpoint's (records from before wall_s have none)
        self.wall_before = max((row.get("wall_s", 0.0) for row in kept), default=0.0)
        with writing(output / "config.json"):
            (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        if self.uses_trackers:
            init = {"wandb": {"group": group, "job_type": job_type, "name": run_name or run_label(config),
                              "dir": str(output),
                              **(wandb_identity(output, resumed_at > 0) if tracker == "wandb" else {})}}
            _init_trackers(accelerator, tracker, project, config, init)
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

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Writes a row to metrics.jsonl, stamped with `wall_s`: the seconds the run has trained so far,
        up to the moment the row is logged (evaluations and checkpoints included, the time lost to a
        crash not), and passes `metrics` to the trackers."""
        if not self.active:
            return
        wall_s = self.wall_before + time.perf_counter() - self.began
        with writing(self.metrics_path), self.metrics_path.open("a") as record:
            record.write(json.dumps({"step": step, "wall_s": wall_s, **metrics}) + "\n")
        if self.uses_trackers:
            self.accelerator.log(metrics, step=step)

    def finish(self) -> None:
        if self.active and self.uses_trackers:
            self.accelerator.end_training()


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


def publish_comparison(header: list[str], rows: list[list[str]], plots: list[Path], project: str, group: str,
                       directory: Path) -> None:
    """The comparison table as a wandb Table, and its plots (the step's time split, bytes per step: figures a
    W&B panel cannot draw from the runs' curves), in a summary run of the experiment's group."""
    import wandb

    run = wandb.init(project=project, group=group, job_type="summary", name=f"{group}-summary", dir=str(directory))
    run.log({"comparison": wandb.Table(columns=header, data=rows),
             **{f"comparison/{plot.stem}": wandb.Image(str(plot)) for plot in plots}})
    run.finish()
